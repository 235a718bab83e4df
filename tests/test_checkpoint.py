"""Checkpoints hold arrays and JSON only (``.npz`` read with ``allow_pickle=False``): every kind of
``TrainState`` round-trips bit for bit through the tree rebuilt from its configuration; a
malicious pickle planted where the checkpoint should be, or an older version's
``checkpoint.pkl``, is never unpickled and gets a message saying what it is; a file whose
configuration does not describe its parameters is refused clearly; no module of the package
imports ``pickle``."""
import ast
import json
import os
import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbackprop import cli, train
from jbackprop.train import Config, TrainState, data, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
XOR = ["--dataset", "xor", "--width", "8", "--batch-size", "64", "--epochs", "1", "--no-progress"]


class _Evil:
    """Unpickling this creates ``marker``: what a pickle handed to you could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _evil_pickle(marker) -> bytes:
    return pickle.dumps({"state": _Evil(marker), "history": [], "config": {}})


def _rewrite_metadata(path, change):
    """Edit the JSON metadata of the checkpoint at ``path`` in place."""
    with np.load(path) as z:
        arrays = dict(z)
    meta = json.loads(arrays["__meta__"].tobytes())
    change(meta)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **arrays)


@pytest.mark.parametrize("cfg", [
    Config(model="mlp", width=8),
    Config(model="resnet-s", width=8, depth=2, optimizer="sgd", schedule="constant"),
    Config(model="cnn", optimizer="momentum", weight_decay=0.0),
], ids=["mlp-adamw-cosine", "resnet-sgd-constant", "cnn-momentum-no-decay"])
def test_checkpoint_round_trip_holds_only_arrays_and_json(tmp_path, cfg):
    """After two optimiser steps every leaf (parameters, optax state, epoch) comes back bit for
    bit in the same tree; the file is an .npz of plain numeric arrays whose metadata lists each
    leaf's key path, shape and dtype."""
    ds = data.xor()
    x, y = jnp.asarray(ds.x_train[:32]), jnp.asarray(ds.y_train[:32])
    init, apply = train.make_model(cfg, (2,), 2)
    opt = train.make_optimizer(cfg, 10)
    params = init(jax.random.PRNGKey(1))
    state = TrainState(params, opt.init(params), jnp.array(7, jnp.int32))
    state, _ = train.train_epoch(train.make_loss(apply, "classification", cfg.backward), opt, state,
                                 x, y, jax.random.PRNGKey(2), 16)
    fp = data.fingerprint(ds)
    path = str(tmp_path / trainer.CHECKPOINT)
    history = [{"epoch": 8, "train_loss": 0.5}]
    trainer.save_checkpoint(path, state, history, cfg, fp)

    back, h, saved = trainer.load_checkpoint(path)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    assert h == history and saved == {f: getattr(cfg, f) for f in saved}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with np.load(path, allow_pickle=False) as z:              # nothing in it needs pickle
        n = len(jax.tree.leaves(state))
        assert sorted(z.files) == sorted([f"leaf_{i:05d}" for i in range(n)] + ["__meta__"])
        assert all(z[k].dtype != object for k in z.files)
        meta = json.loads(z["__meta__"].tobytes())
    assert meta["format"] == "jbackprop-checkpoint" and meta["version"] == 1 and meta["epoch"] == 8
    paths = [leaf["path"] for leaf in meta["leaves"]]
    assert paths[-1] == ".epoch" and paths[0].startswith(".params")
    assert sum(p.startswith(".opt_state") for p in paths) == len(jax.tree.leaves(state.opt_state))
    assert meta["dataset"]["sha256"] == fp["sha256"]
    assert trainer.checkpoint_metadata(path)["leaves"] == meta["leaves"]


def test_a_planted_pickle_never_runs(tmp_path, capsys):
    """A pickle whose unpickling creates a file, planted as the checkpoint of a run folder: the
    library and ``--resume`` refuse it, saying it is a pickle, and the file is never created."""
    check = tmp_path / "the-pickle-does-run-when-unpickled"
    pickle.loads(_evil_pickle(check))                     # the test's pickle is really harmful
    assert check.exists()

    marker = tmp_path / "code-ran"
    run = tmp_path / "run"
    run.mkdir()
    (run / trainer.CHECKPOINT).write_bytes(_evil_pickle(marker))
    path = str(run / trainer.CHECKPOINT)
    for read in (trainer.load_checkpoint, trainer.checkpoint_metadata):
        with pytest.raises(ValueError, match=r"is not a readable jbackprop checkpoint \(it is a "
                                             r"pickle, not an .npz archive; a pickle can run "
                                             r"arbitrary code when loaded, so it was not opened\)"):
            read(path)
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jbackprop train: --resume {run}: {path} is not a readable jbackprop "
                          "checkpoint (it is a pickle") and err.count("\n") == 1
    # a new run there is refused too (it holds something named like a checkpoint)
    assert cli.main(["train", *XOR, "--out", str(run)]) == 2
    assert "already holds a run (checkpoint.npz)" in capsys.readouterr().err
    assert not marker.exists()


def test_an_old_pickle_checkpoint_is_never_unpickled(tmp_path, capsys):
    """An older version's ``checkpoint.pkl`` (here a harmful one): ``--resume`` says it was
    written by an older version and cannot be resumed; a new run into the folder is refused
    without ``--overwrite``, and with it trains and removes the pickle, never opening it."""
    marker = tmp_path / "code-ran"
    run = tmp_path / "old-run"
    run.mkdir()
    (run / trainer.OLD_CHECKPOINT).write_bytes(_evil_pickle(marker))
    old = run / trainer.OLD_CHECKPOINT
    message = (f"{old} was written by an older version of jbackprop and cannot be resumed: it is "
               "a pickle, which can run arbitrary code when loaded, so this version never opens it")
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jbackprop train: --resume {run}: {message}") and err.count("\n") == 1
    for read in (trainer.load_checkpoint, trainer.checkpoint_metadata):
        for path in (old, run / trainer.CHECKPOINT):
            with pytest.raises(ValueError, match="written by an older version of jbackprop"):
                read(str(path))
    assert cli.main(["train", *XOR, "--out", str(run)]) == 2
    assert (f"--out {run} already holds a run (checkpoint.pkl); continue it with --resume "
            f"{run}, or replace it with --overwrite") in capsys.readouterr().err
    assert cli.main(["train", *XOR, "--out", str(run), "--overwrite"]) == 0
    assert not old.exists() and (run / trainer.CHECKPOINT).exists()
    assert not marker.exists()


def test_a_checkpoint_whose_configuration_names_another_model(tmp_path, capsys):
    """The metadata says ResNet-S (or another width) but the arrays are an MLP's: a clear
    ``ValueError`` naming the first differing leaf, exit 2 from ``--resume``; never a
    ``TypeError`` or a shape error inside the model."""
    assert cli.main(["train", *XOR, "--out", str(tmp_path)]) == 0
    path = tmp_path / trainer.CHECKPOINT
    capsys.readouterr()
    for change, first in ((dict(model="resnet-s"), "the configuration's .params['blocks']"),
                          (dict(width=16), "the configuration's .params[0]['W'] (16, 2) float32, "
                                           "the file's .params[0]['W'] (8, 2) float32")):
        original = path.read_bytes()
        _rewrite_metadata(path, lambda m: m["config"].update(change))
        with pytest.raises(ValueError, match="does not match its own configuration") as e:
            trainer.load_checkpoint(str(path))
        assert first in str(e.value)
        assert cli.main(["train", "--resume", str(tmp_path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "does not match its own configuration" in err and first in err
        assert "Traceback" not in err and err.count("\n") == 1
        path.write_bytes(original)
    assert trainer.load_checkpoint(str(path))[0].epoch == 1


def test_no_module_of_the_package_imports_pickle():
    """``import pickle`` (or a pickle-based loader) nowhere in ``jbackprop/``, and no
    ``allow_pickle=True``."""
    found = []
    for file in sorted((ROOT / "jbackprop").rglob("*.py")):
        source = file.read_text()
        for node in ast.walk(ast.parse(source)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{file.relative_to(ROOT)}: {n}" for n in names
                      if n.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle",
                                             "joblib", "shelve")]
        if "allow_pickle=True" in source:
            found.append(f"{file.relative_to(ROOT)}: allow_pickle=True")
    assert not found, found
    assert os.path.splitext(trainer.CHECKPOINT)[1] == ".npz"

"""Bad input that the per-module test files do not already cover: dataset files, the training
API, checkpoints, the ``jbackprop train`` command line, model initialisers, and empty batches.
Each gets a ``ValueError``/``TypeError`` (or, from the command line, exit status 2 and one line on
stderr) that names the argument. docs/robustness.md lists every case, here and elsewhere."""
import io
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import cli, train
from jbackprop.train import data, trainer
from jbackprop.train import Config

GOOD = dict(x_train=np.ones((6, 3)), y_train=np.arange(6) % 2, x_test=np.ones((2, 3)),
            y_test=np.array([0, 1]))


# --- dataset files (missing arrays and mismatched lengths: tests/test_data.py) -----------------
@pytest.mark.parametrize("change, match", [
    (dict(x_train=np.ones(6), x_test=np.ones(2)), r"x_train must have shape \(examples, features"),
    (dict(y_train=np.ones((6, 2), int), y_test=np.ones((2, 2), int)),
     r"integer class labels must have one label per row.*y_train \(6, 2\)"),
    (dict(x_train=np.array([["a", "b", "c"]] * 6)), r"x_train must be a numeric array.*<U1"),
    (dict(x_train=np.full((6, 3), np.nan)), "x_train contains NaN or infinite values"),
    (dict(y_test=np.array([np.inf, 0.0])), "y_test contains NaN or infinite values"),
    (dict(y_test=np.array([0.5, 1.0])), "y_train has dtype int64 but y_test float64"),
    (dict(x_test=np.ones((0, 3)), y_test=np.ones(0, int)), "the test set is empty"),
    (dict(x_train=np.float64(1.0)), r"x_train must be a numeric array.*shape \(\)"),
], ids=["x-one-axis", "labels-2d", "strings", "nan", "inf", "int-vs-float-labels",
        "empty-test-set", "scalar-x"])
def test_dataset_file_contents(tmp_path, change, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **{**GOOD, **change})
    with pytest.raises(ValueError, match=match):
        data.load(str(path))


@pytest.mark.parametrize("content", [b"", b"not a zip file", b"\x93NUMPY"],
                         ids=["empty", "garbage", "truncated-npy"])
def test_dataset_file_not_an_npz(tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad.npz: not a readable .npz file"):
        data.load(str(path))


def test_dataset_file_with_object_arrays(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, **{**GOOD, "x_train": np.array([None] * 6, dtype=object)})
    with pytest.raises(ValueError, match=r"objects.npz: not a readable .npz file.*allow_pickle"):
        data.load(str(path))


# --- configuration and the training API -------------------------------------------------------
@pytest.mark.parametrize("field, value, match", [
    ("epochs", 0, r"epochs must be an integer ≥ 1, got 0"),
    ("epochs", 2.5, r"epochs must be an integer ≥ 1, got 2.5"),
    ("batch_size", -1, r"batch_size must be an integer ≥ 1"),
    ("width", 0, r"width must be an integer ≥ 1"),
    ("depth", 0, r"depth must be an integer ≥ 1"),
    ("lr", 0.0, r"lr must be a finite number > 0, got 0.0"),
    ("lr", float("nan"), r"lr must be a finite number > 0, got nan"),
    ("weight_decay", -1e-4, r"weight_decay must be a finite number ≥ 0"),
    ("input_noise", float("inf"), r"input_noise must be a finite number ≥ 0"),
    ("schedule", "linear", r"schedule must be 'cosine' or 'constant', got 'linear'"),
])
def test_config_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        Config(**{field: value})


def _mlp_loss():
    params = jb.mlp_init(jax.random.PRNGKey(0), [3, 4, 2])
    return params, train.make_loss(jb.mlp, "classification", "manual")


def test_empty_batch_in_the_training_api():
    """An empty batch has no mean loss: the loss (also inside evaluate) and Algorithm 1 refuse
    it at trace time instead of returning NaN or indexing out of bounds."""
    params, loss = _mlp_loss()
    x, y = jnp.ones((0, 3)), jnp.zeros((0,), jnp.int32)
    with pytest.raises(ValueError, match=r"loss: x is an empty batch \(shape \(0, 3\)\)"):
        jax.grad(loss)(params, x, y)
    with pytest.raises(ValueError, match="x is an empty batch"):
        jax.jit(lambda p: train.evaluate(jb.mlp, p, x, y, "classification"))(params)
    with pytest.raises(ValueError, match=r"algorithm1: x is an empty batch"):
        train.algorithm1(loss, params, x, y, jax.random.PRNGKey(0), 0.1, 3)


def test_mismatched_examples_in_the_training_api():
    params, loss = _mlp_loss()
    x, y = jnp.ones((4, 3)), jnp.zeros((3,), jnp.int32)
    with pytest.raises(ValueError, match=r"loss: x and y must have one row per example, got x "
                                         r"\(4, 3\) and y \(3,\)"):
        loss(params, x, y)
    with pytest.raises(ValueError, match="train_epoch: x and y must have one row per example"):
        _epoch(loss, params, x, y, 2)


@pytest.mark.parametrize("batch_size", [0, 5])
def test_train_epoch_batch_size(batch_size):
    """batch_size 0 (a division by zero) or above the examples (an epoch of no steps)."""
    params, loss = _mlp_loss()
    with pytest.raises(ValueError, match=rf"batch_size must be in 1..4 .*got {batch_size}"):
        _epoch(loss, params, jnp.ones((4, 3)), jnp.zeros((4,), jnp.int32), batch_size)


def _epoch(loss, params, x, y, batch_size):
    opt = train.make_optimizer(Config(optimizer="sgd"), 1)
    state = train.TrainState(params, opt.init(params), jnp.zeros((), jnp.int32))
    return train.train_epoch(loss, opt, state, x, y, jax.random.PRNGKey(0), batch_size)


@pytest.mark.parametrize("call, match", [
    (lambda: jb.mlp_init(jax.random.PRNGKey(0), [3, 0, 2]), r"mlp_init: sizes .* got \[3, 0, 2\]"),
    (lambda: jb.mlp_init(jax.random.PRNGKey(0), [3, 2.5, 2]), r"each an integer ≥ 1"),
    (lambda: jb.resnet_s_init(jax.random.PRNGKey(0), 3, 0, 2, 2), "width must be an integer ≥ 1, got 0"),
    (lambda: jb.resnet_s_init(jax.random.PRNGKey(0), 0, 4, 2, 2), "in_dim must be an integer"),
    (lambda: jb.resnet_s_init(jax.random.PRNGKey(0), 3, 4, 2, 0), "out_dim must be an integer"),
], ids=["mlp-zero-width", "mlp-fractional-width", "resnet-zero-width", "resnet-zero-input",
        "resnet-zero-output"])
def test_model_initialisers(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- checkpoints ---------------------------------------------------------------------------------
def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _meta(**changes) -> np.ndarray:
    """The ``__meta__`` entry of a checkpoint: JSON as uint8 bytes."""
    meta = dict(format="jbackprop-checkpoint", version=1, epoch=0, config={}, history=[],
                dataset=dict(arrays={}, sha256="0", example_shape=[2], num_outputs=2), leaves=[])
    return np.frombuffer(json.dumps({**meta, **changes}).encode(), np.uint8)


@pytest.mark.parametrize("content, why", [
    (b"\xfd\x00 random bytes", "not an .npz archive"),
    (_npz(__meta__=_meta())[:60], "BadZipFile"),
    (_npz(weights=np.ones(3)), "no __meta__ entry"),
    (_npz(__meta__=np.frombuffer(b"{not json", np.uint8)), "JSONDecodeError"),
    (_npz(__meta__=_meta(version=2)), "format version 2; this version of jbackprop reads version 1"),
    (_npz(__meta__=_meta(config={"no_such_field": 1})), r"unknown fields \['no_such_field'\]"),
    (_npz(__meta__=_meta(config={"width": 0})), "width must be an integer ≥ 1"),
    (_npz(__meta__=_meta(leaves=[{}]), leaf_00000=np.ones(2)), "does not match its own configuration"),
    (pickle.dumps({"state": 1, "history": [], "config": {}}), "it is a pickle"),
], ids=["garbage", "truncated", "no-metadata", "metadata-not-json", "newer-version",
        "unknown-config-field", "invalid-config", "leaves-unlike-the-config", "pickle"])
def test_unreadable_checkpoint(tmp_path, content, why, capsys):
    path = tmp_path / trainer.CHECKPOINT
    path.write_bytes(content)
    with pytest.raises(ValueError, match=why):
        trainer.load_checkpoint(str(path))
    assert cli.main(["train", "--resume", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jbackprop train: --resume {tmp_path}: {path}") and err.count("\n") == 1
    assert ("is not a readable jbackprop checkpoint" in err
            or "does not match its own configuration" in err)


# --- the command line: exit status 2 and a message naming the flag's field ------------------------
@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "epochs must be an integer ≥ 1, got 0"),
    (["--batch-size", "0"], "batch_size must be an integer ≥ 1, got 0"),
    (["--batch-size", "300"], "batch_size must be in 1..256"),
    (["--width", "0"], "width must be an integer ≥ 1, got 0"),
    (["--model", "resnet-s", "--depth", "0"], "depth must be an integer ≥ 1, got 0"),
    (["--lr", "-1"], "lr must be a finite number > 0, got -1.0"),
    (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["--weight-decay", "-1"], "weight_decay must be a finite number ≥ 0"),
    (["--input-noise", "-0.5"], "input_noise must be a finite number ≥ 0"),
    (["--dataset", "missing.npz"], "dataset file 'missing.npz' does not exist"),
], ids=["epochs-0", "batch-0", "batch-too-large", "width-0", "depth-0", "lr-negative", "lr-nan",
        "weight-decay-negative", "noise-negative", "dataset-missing"])
def test_cli_train_arguments(tmp_path, capsys, args, message):
    base = ["train", "--dataset", "xor", "--no-progress", "--out", str(tmp_path / "run")]
    assert cli.main(base + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("jbackprop train: ") and message in err and "Traceback" not in err


def test_cli_train_bad_dataset_file(tmp_path, capsys):
    path = tmp_path / "one-feature.npz"
    np.savez(path, **{**GOOD, "x_train": np.ones(6), "x_test": np.ones(2)})
    assert cli.main(["train", "--dataset", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "x_train must have shape (examples, features...), got (6,)" in capsys.readouterr().err


# --- empty batches in the modules: not an error -------------------------------------------------
def test_modules_accept_an_empty_batch():
    """A batch of no examples is a batch: as in jax.numpy, every module returns an empty output
    of the right shape, and the parameter gradients are the empty sum, zero. (The mean loss of
    an empty batch is what is undefined: the training API refuses it, see above.)"""
    p_mm = {"W": jnp.ones((3, 4)), "b": jnp.ones(3)}
    p_conv = {"w": jnp.ones((3, 2, 5)), "b": jnp.ones(5)}
    p_ln = {"beta": jnp.ones(4), "gamma": jnp.ones(4)}
    cases = [(jb.mm, p_mm, (0, 4), (0, 3)), (jb.conv1d, p_conv, (0, 7, 2), (0, 7, 5)),
             (jb.layer_norm, p_ln, (0, 4), (0, 4))]
    for fn, p, in_shape, out_shape in cases:
        z = jnp.ones(in_shape)
        assert fn(p, z).shape == out_shape == jax.vmap(fn, (None, 0))(p, z).shape
        g = jax.grad(lambda p: jnp.sum(fn(p, z)))(p)
        assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(g)), fn.__name__
    assert jb.relu(jnp.ones((0, 3))).shape == (0, 3)
    assert jb.cross_entropy_loss(jnp.ones((0, 3)), jnp.zeros((0,), jnp.int32)).shape == (0,)

"""``jbackprop train`` never loses a run and never ignores the user: bad ``--out``, ``--seed``
and ``check --json`` are refused by name before any work; ``--resume`` refuses flags that
contradict the checkpoint, extends a run with ``--epochs``, and refuses a dataset that changed;
a new run does not overwrite another run's checkpoint without ``--overwrite``; ``.npz`` examples
of any shape train, single-class labels are refused and bool labels are two classes.

Every case runs ``jbackprop.cli.main`` as the command line does, and reads the exit status and
the one line on stderr."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbackprop import cli, train
from jbackprop.train import Config, data, trainer

XOR = ["--dataset", "xor", "--width", "8", "--batch-size", "64", "--no-progress"]


def _refused(capsys, argv, *expected):
    """``main(argv)`` exits 2 with one line on stderr that contains every ``expected``."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jbackprop ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in expected:
        assert part in err, (part, err)
    return err.strip()


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if training (or the checks) would start: refusals come before any work."""
    def never(*args, **kwargs):
        raise AssertionError("work started before the arguments were refused")
    monkeypatch.setattr(trainer, "fit", never)
    import jbackprop.check.cases
    monkeypatch.setattr(jbackprop.check.cases, "library_reports", never)


def _npz(path, x_train, y_train, x_test, y_test):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


def _squares(path, n=64, seed=0, labels=None):
    """``n`` examples of shape (2, 2), labelled by the sign of their trace."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2, 2)).astype(np.float32)
    y = (x[:, 0, 0] + x[:, 1, 1] > 0).astype(np.int64) if labels is None else labels
    return _npz(path, x, y, x[:8], y[:8])


# --- refused by name before any work ------------------------------------------------------------
def test_out_naming_a_file_is_refused(tmp_path, capsys, no_training):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    _refused(capsys, ["train", *XOR, "--out", str(file)], f"--out {file}: is a file, not a folder")
    _refused(capsys, ["train", *XOR, "--out", str(file / "run")],
             f"--out {file / 'run'}: cannot be created: {file} is a file, not a folder")
    assert file.read_text() == "mine"


@pytest.mark.parametrize("seed", [str(10**23), "-1", str(2**32)])
def test_seed_out_of_range_is_refused(tmp_path, capsys, no_training, seed):
    _refused(capsys, ["train", *XOR, "--seed", seed, "--out", str(tmp_path / "run")],
             "jbackprop train: --seed: seed must be an integer in 0..4294967295", f"got {seed}")
    with pytest.raises(ValueError, match="seed must be an integer in 0..4294967295"):
        Config(seed=int(seed))
    assert not (tmp_path / "run").exists()


def test_check_json_that_cannot_be_written_is_refused_before_any_check(tmp_path, capsys,
                                                                      no_training):
    _refused(capsys, ["check", "--module", "relu", "--json", str(tmp_path)],
             f"jbackprop check: --json {tmp_path}: is a folder; give a file path, such as "
             f"{tmp_path / 'check.json'}")
    missing = tmp_path / "no-such-folder" / "check.json"
    _refused(capsys, ["check", "--module", "relu", "--json", str(missing)],
             f"--json {missing}: its folder {missing.parent} does not exist")


# --- --resume: contradicting flags, extending, a changed dataset --------------------------------
def test_resume_refuses_flags_that_contradict_the_checkpoint(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert cli.main(["train", *XOR, "--epochs", "1", "--out", run]) == 0
    before = (tmp_path / "run" / trainer.CHECKPOINT).read_bytes()
    capsys.readouterr()
    err = _refused(capsys, ["train", "--resume", run, "--epochs", "5", "--lr", "0.5",
                            "--model", "resnet-s", "--no-progress"],
                   f"--resume {run}: --model resnet-s, --lr 0.5 contradict the checkpoint "
                   "(model mlp, lr 0.001); a resumed run keeps its configuration, only --epochs "
                   "(to extend it) and --devices, --model-parallel may change")
    assert "--epochs" not in err.split("contradict")[0]            # extending is not a contradiction
    for flags, message in (
            (["--dataset", "housing"], "--dataset housing contradicts the checkpoint (dataset xor)"),
            (["--width", "16"], "--width 16 contradicts the checkpoint (width 8)"),
            (["--seed", "3", "--input-noise", "0.1"], "--seed 3, --input-noise 0.1 contradict"),
            (["--schedule", "constant"], "--schedule constant contradicts"),
            (["--out", str(tmp_path / "elsewhere")],
             f"--out {tmp_path / 'elsewhere'}: a resumed run continues in its own folder"),
            (["--overwrite"], f"--overwrite cannot be combined with --resume {run}"),
            (["--epochs", "0"], f"--epochs 0: the run in {run} has already trained 1 epoch; "
                                "give at least 1")):
        _refused(capsys, ["train", "--resume", run, *flags, "--no-progress"], message)
    assert (tmp_path / "run" / trainer.CHECKPOINT).read_bytes() == before    # nothing happened
    # flags equal to the checkpoint's are fine (1 epoch of 1: nothing left to train)
    assert cli.main(["train", "--resume", run, "--dataset", "xor", "--lr", "0.001", "--width",
                     "8", "--model", "mlp", "--out", run, "--no-progress"]) == 0
    # the library refuses the same
    with pytest.raises(ValueError,
                       match=r"another configuration \(saved, now\): \{'width': \(8, 16\)\}"):
        trainer.fit(Config(dataset="xor", width=16, batch_size=64, epochs=1, input_noise=0.0), run,
                    resume=True, progress=False)


def test_resume_with_more_epochs_extends_the_run(tmp_path, capsys):
    """``--resume DIR --epochs 4`` after 2 epochs trains epochs 3 and 4. With a constant
    learning rate the result equals, bit for bit, a run asked for with 4 epochs; with the
    cosine schedule (recomputed for the new total) it trains on and says so."""
    for schedule in ("constant", "cosine"):
        args = [*XOR, "--schedule", schedule, "--lr", "0.01"]
        short, full = str(tmp_path / f"{schedule}-2-then-4"), str(tmp_path / f"{schedule}-4")
        assert cli.main(["train", *args, "--epochs", "2", "--out", short]) == 0
        assert cli.main(["train", *args, "--epochs", "4", "--out", full]) == 0
        capsys.readouterr()
        assert cli.main(["train", "--resume", short, "--epochs", "4", "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert f"resuming {short} at epoch 2 of 4" in out
        assert ("now decays over 4 epochs (it was 2)" in out) == (schedule == "cosine")
        a, ha, cfg = trainer.load_checkpoint(os.path.join(short, trainer.CHECKPOINT))
        b, hb, _ = trainer.load_checkpoint(os.path.join(full, trainer.CHECKPOINT))
        assert int(a.epoch) == 4 and [h["epoch"] for h in ha] == [1, 2, 3, 4] and cfg["epochs"] == 4
        assert json.load(open(os.path.join(short, "metrics.json")))["config"]["epochs"] == 4
        same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        assert same == (schedule == "constant"), schedule
        if schedule == "constant":
            assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]


def test_resume_after_the_dataset_changed_is_refused(tmp_path, capsys):
    """The checkpoint remembers the dataset's fingerprint (shapes, dtypes, SHA-256 of the
    arrays): new contents — other shapes or only other values — are refused before training,
    not an ``mm`` shape error; the same arrays under another path (a moved file) resume."""
    path = _squares(tmp_path / "mine.npz")
    run = str(tmp_path / "run")
    base = ["--batch-size", "16", "--width", "8", "--no-progress"]
    assert cli.main(["train", "--dataset", path, *base, "--epochs", "1", "--out", run]) == 0
    capsys.readouterr()
    original = open(path, "rb").read()
    rng = np.random.default_rng(1)
    for x in (rng.standard_normal((64, 4)), rng.standard_normal((64, 2, 2))):   # shape; values
        _npz(path, x.astype(np.float32), np.arange(64) % 2, x[:8].astype(np.float32), np.arange(8) % 2)
        _refused(capsys, ["train", "--resume", run, "--epochs", "2", "--no-progress"],
                 f"jbackprop train: --resume: the dataset changed since the checkpoint in {run}: "
                 f"{path} holds x_train {x.shape} float32", "the checkpoint was trained on "
                 "x_train (64, 2, 2) float32", "restore the data, or start a new run")
    moved = tmp_path / "moved.npz"
    moved.write_bytes(original)
    other = _squares(tmp_path / "other.npz", seed=5)
    _refused(capsys, ["train", "--resume", run, "--dataset", other, "--epochs", "2", "--no-progress"],
             f"the dataset {other} is not the checkpoint's {path}")
    assert cli.main(["train", "--resume", run, "--dataset", str(moved), "--epochs", "2",
                     "--no-progress"]) == 0
    assert trainer.load_checkpoint(os.path.join(run, trainer.CHECKPOINT))[2]["dataset"] == str(moved)


# --- a new run into another run's folder -----------------------------------------------------------
def test_new_run_into_a_run_folder_needs_overwrite(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert cli.main(["train", *XOR, "--epochs", "1", "--out", run]) == 0
    ckpt = tmp_path / "run" / trainer.CHECKPOINT
    before = ckpt.read_bytes()
    capsys.readouterr()
    _refused(capsys, ["train", *XOR, "--epochs", "1", "--seed", "1", "--out", run],
             f"jbackprop train: --out {run} already holds a run (checkpoint.npz); continue it "
             f"with --resume {run}, or replace it with --overwrite")
    assert ckpt.read_bytes() == before
    with pytest.raises(trainer.RunExists, match="already holds a run"):
        trainer.fit(Config(dataset="xor", epochs=1), run, progress=False)
    assert cli.main(["train", *XOR, "--epochs", "1", "--seed", "1", "--out", run, "--overwrite"]) == 0
    assert trainer.load_checkpoint(str(ckpt))[2]["seed"] == 1


# --- datasets: examples of any shape, one class, bool labels ---------------------------------------
@pytest.mark.parametrize("model", ["mlp", "resnet-s", "cnn"])
def test_examples_of_several_axes_train(tmp_path, capsys, model):
    """``x_train (N, 2, 2)``: the MLP and ResNet-S see 4 features (flattened), the CNN a 2×2
    image of one channel. It was an ``mm`` shape error."""
    path = _squares(tmp_path / "squares.npz")
    assert cli.main(["train", "--dataset", path, "--model", model, "--width", "8", "--depth", "1",
                     "--batch-size", "16", "--epochs", "1", "--no-progress",
                     "--out", str(tmp_path / model)]) == 0, capsys.readouterr().err
    cfg = Config(model=model, width=8, depth=1)
    init, apply = train.make_model(cfg, (2, 2), 2)
    p, x = init(jax.random.PRNGKey(0)), jnp.arange(4.0).reshape(2, 2)
    flat_init, flat_apply = train.make_model(cfg, (4,), 2)
    if model != "cnn":      # the same network as on 4 features
        np.testing.assert_array_equal(apply(p, x), flat_apply(p, x.reshape(4)))
    if model == "cnn":
        with pytest.raises(ValueError, match=r"the cnn takes examples of shape \(features,\), "
                                             r"\(height, width\) or \(height, width, channels\)"):
            train.make_model(cfg, (2, 2, 2, 2), 2)


@pytest.mark.parametrize("labels", [0, 3], ids=["all-zero", "all-three"])
def test_single_class_labels_are_refused(tmp_path, capsys, labels):
    path = _squares(tmp_path / "one-class.npz", labels=np.full(64, labels))
    _refused(capsys, ["train", "--dataset", path, "--no-progress", "--out", str(tmp_path / "run")],
             f"jbackprop train: {path}: y_train holds a single class (every label is {labels}): "
             "a classifier needs examples of at least two classes")
    assert not (tmp_path / "run").exists()


def test_bool_labels_are_two_classes(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3)).astype(np.float32)
    path = _npz(tmp_path / "bool.npz", x, x[:, 0] > 0, x[:8], x[:8, 0] > 0)
    ds = data.load(path)
    assert ds.task == "classification" and ds.num_outputs == 2 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.y_train, (x[:, 0] > 0).astype(np.int32))
    assert cli.main(["train", "--dataset", path, "--width", "8", "--batch-size", "16", "--epochs",
                     "1", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert json.load(open(tmp_path / "run" / "metrics.json"))["task"] == "classification"
    _npz(tmp_path / "single.npz", x, np.ones(64, bool), x[:8], np.ones(8, bool))
    with pytest.raises(ValueError, match=r"single class \(every label is 1\)"):
        data.load(str(tmp_path / "single.npz"))

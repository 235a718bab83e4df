"""jbackprop.train.data: the datasets, ``.npz`` files, and the ``cli`` extra (scikit-learn,
matplotlib, tqdm) imported only where needed."""
import subprocess
import sys

import numpy as np
import pytest

from jbackprop import cli
from jbackprop.train import data, trainer
from jbackprop.train import Config

CLI_EXTRA = ("sklearn", "matplotlib", "tqdm")


def test_digits_is_a_fixed_stratified_standardised_split():
    a, b = data.digits(), data.digits()
    assert a.x_train.shape == (1437, 64) and a.x_test.shape == (360, 64)
    np.testing.assert_array_equal(a.y_test, b.y_test)                 # fixed split
    assert np.bincount(a.y_test).min() >= 35                          # stratified: ~36 per class
    np.testing.assert_allclose(a.x_train.mean(0), 0, atol=1e-4)       # standardised on train
    # pixels constant in the training set keep scale 1: no test value blows up to ~1e6
    assert np.abs(a.x_test).max() < 100
    assert a.task == "classification" and a.num_outputs == 10


def test_xor_and_housing():
    x = data.xor()
    np.testing.assert_array_equal(x.y_test, [0, 1, 1, 0])
    np.testing.assert_array_equal(x.y_test, x.x_test[:, 0].astype(int) ^ x.x_test[:, 1].astype(int))
    h = data.housing()
    assert h.task == "regression" and h.y_train.shape == (len(h.x_train), 1)


def test_npz_round_trip(tmp_path):
    p = tmp_path / "mine.npz"
    np.savez(p, x_train=np.ones((6, 3)), y_train=np.array([0, 1, 2, 0, 1, 2]),
             x_test=np.ones((2, 3)), y_test=np.array([1, 2]))
    ds = data.load(str(p))
    assert ds.task == "classification" and ds.num_outputs == 3 and ds.x_train.dtype == np.float32
    np.savez(p, x_train=np.ones((4, 2)), y_train=np.ones(4), x_test=np.ones((2, 2)), y_test=np.ones(2))
    assert data.load(str(p)).task == "regression"


@pytest.mark.parametrize("arrays, match", [
    (dict(x_train=np.ones((3, 2)), y_train=np.ones(3), x_test=np.ones((1, 2))), r"missing arrays \['y_test'\]"),
    (dict(x_train=np.ones((3, 2)), y_train=np.ones(2), x_test=np.ones((1, 2)), y_test=np.ones(1)),
     "x_train has 3 rows but y_train has 2"),
    (dict(x_train=np.ones((3, 2)), y_train=np.ones(3), x_test=np.ones((1, 4)), y_test=np.ones(1)),
     r"x_test \(4,\)"),
    (dict(x_train=np.ones((0, 2)), y_train=np.ones(0), x_test=np.ones((1, 2)), y_test=np.ones(1)),
     "the train set is empty"),
    (dict(x_train=np.ones((2, 2)), y_train=np.array([0, -1]), x_test=np.ones((1, 2)), y_test=np.array([0])),
     "labels must be ≥ 0"),
])
def test_npz_bad_files(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(ValueError, match=match):
        data.load(str(p))


def test_unknown_dataset_and_missing_file():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        data.load("mnist")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load("/nonexistent/file.npz")


def test_importing_jbackprop_imports_no_cli_extra():
    """``pip install .`` (no ``cli`` extra) can import the library, the CLI and the trainer."""
    code = ("import jbackprop, jbackprop.cli, jbackprop.train.trainer, sys; "
            f"loaded = sorted({{m for m in sys.modules if m.split('.')[0] in {CLI_EXTRA}}}); "
            "assert not loaded, loaded")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def _without(monkeypatch, *modules):
    """As if ``modules`` were not installed: importing them raises ModuleNotFoundError."""
    for name in list(sys.modules):
        if name.split(".")[0] in modules:
            monkeypatch.delitem(sys.modules, name)
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch):
    _without(monkeypatch, "sklearn")
    with pytest.raises(ModuleNotFoundError, match=r'the digits dataset needs scikit-learn, which '
                                                  r'is not installed: pip install "jbackprop\[cli\]"'):
        data.load("digits")
    assert data.load("xor").name == "xor"                 # the others need only NumPy


def test_fit_without_matplotlib_stops_before_training(monkeypatch, tmp_path):
    _without(monkeypatch, "matplotlib")
    with pytest.raises(ModuleNotFoundError, match=r'curves.png\) needs matplotlib.*'
                                                  r'pip install "jbackprop\[cli\]"'):
        trainer.fit(Config(dataset="xor", epochs=1), str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()                # nothing written


def test_fit_without_tqdm_trains_without_a_bar(monkeypatch, tmp_path, capsys):
    _without(monkeypatch, "tqdm")
    cfg = Config(dataset="xor", epochs=2, width=8, batch_size=64, input_noise=0.0)
    assert len(trainer.fit(cfg, str(tmp_path), progress=True)["epochs"]) == 2
    assert "epochs" not in capsys.readouterr().err


@pytest.mark.parametrize("dataset, missing, message", [
    ("digits", "sklearn", "the digits dataset needs scikit-learn"),
    ("xor", "matplotlib", "drawing the training curves (curves.png) needs matplotlib"),
], ids=["digits-without-scikit-learn", "without-matplotlib"])
def test_cli_train_without_the_cli_extra(tmp_path, capsys, monkeypatch, dataset, missing, message):
    """``jbackprop train`` after ``pip install .`` alone: exit status 2 and what to install."""
    _without(monkeypatch, missing)
    assert cli.main(["train", "--dataset", dataset, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jbackprop train: {message}") and 'pip install "jbackprop[cli]"' in err

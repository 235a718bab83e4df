"""Datasets for training: the scikit-learn digits (default), the notes' XOR and housing
problems, and the user's own ``.npz`` file.

Every loader returns a ``Dataset`` of NumPy arrays, one example per row. The digits need
scikit-learn, from the ``cli`` extra (``pip install "jbackprop[cli]"``); the others need nothing
beyond NumPy.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from typing import NamedTuple

import numpy as np

from jbackprop._optional import import_optional


class Dataset(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: str                 # "classification" (integer labels), "regression" or "sequence"
    num_outputs: int          # classes, regression targets, or the vocabulary (sequence)
    name: str


def digits(test_size: float = 0.2, seed: int = 0) -> Dataset:
    """The 8×8 handwritten digits bundled with scikit-learn (1797 images, no download), a fixed
    stratified train/test split, standardised with the training set's statistics. Needs
    scikit-learn (the ``cli`` extra)."""
    import_optional("sklearn", "the digits dataset")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(d.data.astype(np.float32), d.target.astype(np.int32),
                                              test_size=test_size, stratify=d.target, random_state=seed)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std == 0] = 1.0        # pixels constant in the training set (as sklearn's StandardScaler)
    return Dataset((x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te, "classification", 10, "digits")


def xor(copies: int = 64) -> Dataset:
    """XOR of the MLP lecture: the four points of {0, 1}², label x1 XOR x2 (repeated ``copies``
    times so that mini-batches make sense); the test set is the four points themselves."""
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
    y = np.array([0, 1, 1, 0], np.int32)
    return Dataset(np.tile(x, (copies, 1)), np.tile(y, copies), x, y, "classification", 2, "xor")


def housing(n: int = 256, seed: int = 0) -> Dataset:
    """The housing-price problem of the notes (7.11): price ≈ ReLU(w · size + b), one input, one
    real output, with noise; sizes in thousands of square feet."""
    rng = np.random.default_rng(seed)
    size = rng.uniform(0.5, 3.5, (n, 1)).astype(np.float32)
    price = np.maximum(1.2 * size - 0.9, 0) + 0.05 * rng.standard_normal((n, 1)).astype(np.float32)
    cut = int(0.8 * n)
    return Dataset(size[:cut], price[:cut], size[cut:], price[cut:], "regression", 1, "housing")


def sort(length: int = 6, num_digits: int = 5, test_fraction: float = 0.2) -> Dataset:
    """minGPT's sorting demo: a sequence of ``length`` digits in ``0..num_digits−1``, then its
    sorted version, predicted one digit at a time (a causal language model).

    Every one of the ``num_digits ** length`` sequences is used once (15625 by default); a
    fixed hash of each puts ``test_fraction`` of them in the held-out test set. An example is
    ``x = [digits, sorted[:-1]]`` (``2·length − 1`` token ids) with the targets
    ``y = [−1, …, −1, sorted]``: position ``length − 1 + i`` predicts ``sorted[i]``, and ``−1``
    marks positions without a target (the unsorted prompt). Task ``"sequence"``: the
    metric is the exact-sequence accuracy (every sorted digit right), which under teacher
    forcing equals greedy generation's (a wrong digit is the first mistake either way).
    """
    seqs = np.indices((num_digits,) * length).reshape(length, -1).T.astype(np.int32)
    ordered = np.sort(seqs, axis=1)
    x = np.concatenate([seqs, ordered[:, :-1]], axis=1)
    y = np.concatenate([np.full((len(seqs), length - 1), -1, np.int32), ordered], axis=1)
    digest = [hashlib.sha256(s.tobytes()).digest()[0] for s in seqs]   # stable across runs
    test = np.array(digest) < int(256 * test_fraction)
    return Dataset(x[~test], y[~test], x[test], y[test], "sequence", num_digits, "sort")


def from_npz(path: str) -> Dataset:
    """A user's ``.npz`` with ``x_train, y_train, x_test, y_test``. Integer or bool ``y`` (one
    label per row) is classification into ``max(y) + 1`` classes (bool: ``False`` is class 0,
    ``True`` class 1); float ``y`` is regression. Training labels of a single class are refused
    (a classifier of one class reaches loss 0 and 100 % without learning anything). Examples
    may have any shape ``x_train (N, ...)``: ``make_model`` flattens them for the MLP and
    ResNet-S."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset file {path!r} does not exist")
    names = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path) as f:
            files, arrays = sorted(f.files), {k: np.asarray(f[k]) for k in names if k in f}
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable .npz file of numeric arrays ({e})") from e
    missing = [k for k in names if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing}; it has {files}")
    x_tr, y_tr, x_te, y_te = (arrays[k] for k in names)
    for name, a in arrays.items():
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or a.ndim == 0:
            raise ValueError(f"{path}: {name} must be a numeric array with one example per row, "
                             f"got dtype {a.dtype}, shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{path}: {name} contains NaN or infinite values")
    for x, y, split in ((x_tr, y_tr, "train"), (x_te, y_te, "test")):
        if len(x) != len(y):
            raise ValueError(f"{path}: x_{split} has {len(x)} rows but y_{split} has {len(y)}")
        if len(x) == 0:
            raise ValueError(f"{path}: the {split} set is empty")
        if x.ndim < 2:
            raise ValueError(f"{path}: x_{split} must have shape (examples, features...), got "
                             f"{x.shape}; reshape a single feature to ({len(x)}, 1)")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ValueError(f"{path}: x_train examples have shape {x_tr.shape[1:]} but x_test {x_te.shape[1:]}")
    x_tr, x_te = x_tr.astype(np.float32), x_te.astype(np.float32)
    if _labels(y_tr.dtype) != _labels(y_te.dtype):
        raise ValueError(f"{path}: y_train has dtype {y_tr.dtype} but y_test {y_te.dtype}: both "
                         "integer or bool (class labels) or both float (regression targets)")
    if _labels(y_tr.dtype):
        if y_tr.ndim != 1 or y_te.ndim != 1:
            raise ValueError(f"{path}: integer class labels must have one label per row, shape "
                             f"(examples,); got y_train {y_tr.shape}, y_test {y_te.shape}")
        y_tr, y_te = y_tr.astype(np.int64), y_te.astype(np.int64)   # bool: False 0, True 1
        k = int(max(y_tr.max(), y_te.max())) + 1
        if min(y_tr.min(), y_te.min()) < 0:
            raise ValueError(f"{path}: integer labels must be ≥ 0")
        classes = np.unique(y_tr)
        if len(classes) < 2:
            raise ValueError(f"{path}: y_train holds a single class (every label is "
                             f"{int(classes[0])}): a classifier needs examples of at least two "
                             "classes (it would reach loss 0 and 100 % without learning); for "
                             "regression targets, store y as floats")
        return Dataset(x_tr, y_tr.astype(np.int32), x_te, y_te.astype(np.int32), "classification", k,
                       os.path.basename(path))
    y_tr = y_tr.astype(np.float32).reshape(len(y_tr), -1)
    y_te = y_te.astype(np.float32).reshape(len(y_te), -1)
    return Dataset(x_tr, y_tr, x_te, y_te, "regression", y_tr.shape[1], os.path.basename(path))


def _labels(dtype: np.dtype) -> bool:
    """Integer or bool ``y``: class labels (classification); float: regression targets."""
    return bool(np.issubdtype(dtype, np.integer) or dtype == np.bool_)


def fingerprint(ds: Dataset) -> dict:
    """What a checkpoint remembers of the dataset it was trained on, to refuse a resume on other
    data: the name, task, number of outputs, the shape of one example, each array's shape and
    dtype, and a SHA-256 of the four arrays (as the model sees them: after ``load``'s
    conversions) with their shapes and dtypes. JSON-serialisable."""
    h = hashlib.sha256()
    arrays = {}
    for name in ("x_train", "y_train", "x_test", "y_test"):
        a = np.ascontiguousarray(getattr(ds, name))
        arrays[name] = {"shape": list(a.shape), "dtype": str(a.dtype)}
        h.update(f"{name} {a.shape} {a.dtype}\n".encode())
        h.update(a.tobytes())
    return {"name": ds.name, "task": ds.task, "num_outputs": int(ds.num_outputs),
            "example_shape": list(ds.x_train.shape[1:]), "arrays": arrays, "sha256": h.hexdigest()}


def describe(fp: dict) -> str:
    """``x_train (6, 3) float32, y_train (6,) int32, …, sha256 1a2b3c4d…`` of a ``fingerprint``."""
    arrays = ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in fp["arrays"].items())
    return f"{arrays}, sha256 {fp['sha256'][:12]}…"


def load(name: str) -> Dataset:
    """``digits``, ``xor``, ``housing``, ``sort``, or a path ending in ``.npz``."""
    if name.endswith(".npz"):
        return from_npz(name)
    loaders = {"digits": digits, "xor": xor, "housing": housing, "sort": sort}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}: choose digits, xor, housing, sort or a "
                         "PATH.npz")
    return loaders[name]()

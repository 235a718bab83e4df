"""Checkpoints of ``jbackprop train``: one ``.npz`` of NumPy arrays and JSON metadata, written
atomically, read with ``allow_pickle=False`` (nothing in it can run code), checked against the
state its own configuration builds. Pickle checkpoints of earlier versions are recognised and
never opened."""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop.train.loop import Config, TrainState, make_model, make_optimizer

CHECKPOINT = "checkpoint.npz"
OLD_CHECKPOINT = "checkpoint.pkl"     # the pickles of earlier versions: never opened
FORMAT, VERSION = "jbackprop-checkpoint", 1
_META = "__meta__"                    # the .npz entry holding the JSON metadata (uint8 bytes)


def save_checkpoint(path: str, state: TrainState, history: list[dict], cfg: Config,
                    dataset: dict | None = None) -> None:
    """Write ``state``, ``history``, ``cfg`` (and the ``data.fingerprint`` of the dataset) to
    ``path``, one ``.npz`` file, atomically.

    The format (version 1) holds only arrays and JSON, so reading it cannot run code (unlike a
    pickle, which earlier versions wrote): ``leaf_00000``, ``leaf_00001``, … are the leaves of
    ``state`` in ``jax.tree.flatten`` order, as NumPy arrays; ``__meta__`` is a ``uint8`` array
    of UTF-8 JSON: ``format``, ``version``, ``epoch``, ``config``, ``history``, ``dataset`` and
    ``leaves`` — for each leaf its key path in the ``TrainState`` (``.params[0]['W']``,
    ``.opt_state[0].mu[0]['W']``, ``.epoch``; ``jax.tree_util.keystr``), shape and dtype. The
    tree itself (lists, dicts, optax's named tuples) is not serialised: ``load_checkpoint``
    rebuilds it from the configuration and checks the key paths, shapes and dtypes against it.

    Atomic: written to ``path.tmp-PID`` in the same folder, flushed and ``fsync``ed, then
    ``os.replace``d over ``path``; a process killed at any moment leaves the previous checkpoint
    or the new one, and at most a stale temporary file (``fit`` removes those).
    """
    host = jax.tree.map(np.asarray, state)         # replicated or on one device: whole arrays
    leaves, _ = jax.tree_util.tree_flatten_with_path(host)
    meta = {"format": FORMAT, "version": VERSION, "epoch": int(host.epoch),
            "config": dataclasses.asdict(cfg), "history": history, "dataset": dataset,
            "leaves": [{"path": jax.tree_util.keystr(k), "shape": list(a.shape), "dtype": str(a.dtype)}
                       for k, a in leaves]}
    arrays = {f"leaf_{i:05d}": a for i, (_, a) in enumerate(leaves)}
    arrays[_META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _unreadable(path: str, why: str) -> ValueError:
    return ValueError(f"{path} is not a readable jbackprop checkpoint ({why}); remove it to train "
                      "from the start")


def _old_format(path: str) -> ValueError:
    return ValueError(f"{path} was written by an older version of jbackprop and cannot be resumed: "
                      "it is a pickle, which can run arbitrary code when loaded, so this version "
                      "never opens it (checkpoints are now .npz arrays and JSON); start the run "
                      "afresh (--overwrite), or finish it with the version that wrote it")


def checkpoint_metadata(path: str) -> dict:
    """The JSON metadata of the checkpoint at ``path`` (see ``save_checkpoint``), without its
    arrays: ``epoch``, ``config``, ``history``, ``dataset``, ``leaves``.

    Raises ``FileNotFoundError`` if there is none, and ``ValueError`` saying what is wrong for
    anything but a checkpoint of this format: a pickle (an older version's ``checkpoint.pkl``, or
    one planted where the checkpoint should be) is recognised and never unpickled.
    """
    meta, _ = _read(path, arrays=False)
    return meta


def _read(path: str, arrays: bool) -> tuple[dict, dict]:
    folder_old = os.path.join(os.path.dirname(path), OLD_CHECKPOINT)
    if os.path.basename(path) == OLD_CHECKPOINT and os.path.exists(path):
        raise _old_format(path)
    if not os.path.exists(path):
        if os.path.basename(path) == CHECKPOINT and os.path.exists(folder_old):
            raise _old_format(folder_old)
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    if os.path.isdir(path):
        raise _unreadable(path, "it is a folder")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":       # pickle protocol ≥ 2: never handed to pickle
        raise _unreadable(path, "it is a pickle, not an .npz archive; a pickle can run arbitrary "
                                "code when loaded, so it was not opened")
    if head != b"PK\x03\x04":
        raise _unreadable(path, f"not an .npz archive: it starts with {head!r}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if _META not in z.files:
                raise ValueError(f"no {_META} entry; it has {sorted(z.files)[:5]}")
            raw = z[_META]
            if raw.dtype != np.uint8 or raw.ndim != 1:
                raise ValueError(f"{_META} is {raw.dtype} {raw.shape}, not uint8 bytes")
            meta = json.loads(raw.tobytes().decode("utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError(f"its {_META} is not a {FORMAT}")
            if meta.get("version") != VERSION:
                raise ValueError(f"format version {meta.get('version')!r}; this version of "
                                 f"jbackprop reads version {VERSION}")
            for key, kind in (("epoch", int), ("config", dict), ("history", list),
                              ("dataset", dict), ("leaves", list)):
                if not isinstance(meta.get(key), kind):
                    raise ValueError(f"its metadata has no {key} ({kind.__name__})")
            missing = [k for k in ("arrays", "sha256", "example_shape", "num_outputs")
                       if k not in meta["dataset"]]
            if missing:
                raise ValueError(f"its dataset fingerprint lacks {missing}")
            fields = {f.name for f in dataclasses.fields(Config)}
            unknown = sorted(set(meta["config"]) - fields)
            if unknown:
                raise ValueError(f"its configuration has unknown fields {unknown}")
            Config(**meta["config"])                    # its values are valid
            leaves = {}
            if arrays:
                names = [f"leaf_{i:05d}" for i in range(len(meta["leaves"]))]
                if sorted(names + [_META]) != sorted(z.files):
                    raise ValueError(f"it holds {len(z.files) - 1} arrays, its metadata lists "
                                     f"{len(names)}")
                leaves = {n: z[n] for n in names}
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError, TypeError,
            UnicodeDecodeError) as e:     # json.JSONDecodeError is a ValueError
        raise _unreadable(path, f"{type(e).__name__}: {e}") from e
    return meta, leaves


def _template(cfg: Config, meta: dict) -> TrainState:
    """The shapes and dtypes (``jax.ShapeDtypeStruct``) of the ``TrainState`` that ``cfg``
    trains on the checkpoint's dataset: ``init`` and ``opt.init`` traced, nothing computed."""
    ds = meta["dataset"]
    init, _ = make_model(cfg, tuple(ds["example_shape"]), int(ds["num_outputs"]))
    opt = make_optimizer(cfg, 1)                       # the schedule's length: not in the state

    def fresh(key):
        params = init(key)
        return TrainState(params, opt.init(params), jnp.zeros((), jnp.int32))
    return jax.eval_shape(fresh, jax.random.PRNGKey(0))


def load_checkpoint(path: str) -> tuple[TrainState, list[dict], dict]:
    """``(state, history, config)`` from the checkpoint at ``path``.

    Read with ``np.load(..., allow_pickle=False)``: nothing in the file can run code. The
    ``TrainState`` is rebuilt robustly: a fresh template state is traced (``jax.eval_shape``, no
    computation) from the saved configuration and dataset shape — ``make_model``'s ``init`` and
    ``make_optimizer(...).init`` — and its leaves' key paths, shapes and dtypes must equal
    those listed in the file and those of the stored arrays; the arrays then fill the
    template's tree. So a file whose configuration does not describe its parameters (another
    model, width, optimiser) is a ``ValueError`` naming the first difference, never a shape
    error later. Configuration fields missing from the file take ``Config``'s defaults.

    Raises ``FileNotFoundError`` if there is no checkpoint, and ``ValueError`` saying what is
    wrong for anything else (an older version's pickle included: see ``checkpoint_metadata``).
    """
    meta, arrays = _read(path, arrays=True)
    try:
        cfg = Config(**meta["config"])
        template = _template(cfg, meta)
    except (ValueError, TypeError, KeyError) as e:
        raise _unreadable(path, f"its configuration cannot be built: {type(e).__name__}: {e}") from e
    expected, treedef = jax.tree_util.tree_flatten_with_path(template)
    want = [(jax.tree_util.keystr(k), list(a.shape), str(a.dtype)) for k, a in expected]
    listed = [(leaf.get("path"), leaf.get("shape"), leaf.get("dtype")) if isinstance(leaf, dict)
              else (None, None, None) for leaf in meta["leaves"]]
    stored = [(p, list(a.shape), str(a.dtype)) for (p, _, _), a in zip(listed, arrays.values())]
    for have in (listed, stored):
        if have != want:
            first = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b),
                         min(len(want), len(have)))
            show = lambda t, i: (f"{t[i][0]} {tuple(t[i][1] or ())} {t[i][2]}" if i < len(t)
                                 else "nothing")
            raise ValueError(
                f"{path} does not match its own configuration (model {cfg.model!r}, width "
                f"{cfg.width}, depth {cfg.depth}, optimizer {cfg.optimizer!r}, schedule "
                f"{cfg.schedule!r}, weight_decay {cfg.weight_decay}): that configuration has "
                f"{len(want)} arrays, the file {len(have)}; the first difference is leaf {first}: "
                f"the configuration's {show(want, first)}, the file's {show(have, first)}; was its "
                f"metadata edited? remove it to train from the start")
    state = jax.tree.unflatten(treedef, [jnp.asarray(a) for a in arrays.values()])
    if int(state.epoch) != meta["epoch"]:
        raise _unreadable(path, f"its metadata says epoch {meta['epoch']}, its state "
                                f"{int(state.epoch)}")
    return state, meta["history"], meta["config"]


def existing_run(out_dir: str) -> str | None:
    """The checkpoint file of a run already in ``out_dir`` (this format or an older version's
    pickle), or ``None``."""
    for name in (CHECKPOINT, OLD_CHECKPOINT):
        if os.path.exists(os.path.join(out_dir, name)):
            return os.path.join(out_dir, name)
    return None

"""The loop behind ``jbackprop train``: epochs with a progress bar, an atomic checkpoint every
epoch, ``--resume``, a stop with a clear message on a non-finite loss, Ctrl-C, and
``metrics.json`` and ``curves.png`` in the output folder.

It needs the ``cli`` extra (``pip install "jbackprop[cli]"``): matplotlib for the curves,
scikit-learn for the digits, tqdm for the progress bar (without it, no bar). Each is imported
only when used."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import pickle
import time

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop._optional import import_optional
from jbackprop.train import data as datasets, distributed
from jbackprop.train.loop import (Config, TrainState, evaluate, make_loss, make_model, make_optimizer,
                             train_epoch)

CHECKPOINT = "checkpoint.pkl"


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or Inf; the last good checkpoint is kept."""


def save_checkpoint(path: str, state: TrainState, history: list[dict], cfg: Config) -> None:
    """Write atomically: a temporary file in the same folder, flushed, then renamed over."""
    blob = {"state": jax.tree.map(np.asarray, state), "history": history,
            "config": dataclasses.asdict(cfg)}
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        pickle.dump(blob, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str) -> tuple[TrainState, list[dict], dict]:
    """``(state, history, config)`` from ``path``; a ``ValueError`` naming it if it is not one."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    fields = {f.name for f in dataclasses.fields(Config)}
    try:
        with open(path, "rb") as f:
            blob = pickle.load(f)
        state, history, config = blob["state"], blob["history"], blob["config"]
        if not (isinstance(state, TrainState) and isinstance(history, list) and set(config) <= fields):
            raise ValueError("unexpected contents")
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, KeyError,
            TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable jbackprop checkpoint ({type(e).__name__}: "
                         f"{e}); remove it to train from the start") from e
    return jax.tree.map(jnp.asarray, state), history, config


def fit(cfg: Config, out_dir: str, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg`` and write ``metrics.json``, ``curves.png`` and checkpoints to ``out_dir``.

    Returns the metrics dict. Raises ``NonFiniteLoss`` (after keeping the last good checkpoint)
    and re-raises ``KeyboardInterrupt`` after saving one. Without matplotlib (the ``cli``
    extra) it raises ``ModuleNotFoundError`` at once, before training.
    """
    start = time.perf_counter()
    mesh = _mesh(cfg) if cfg.devices != 1 else None  # refused before anything is written
    import_optional("matplotlib", "drawing the training curves (curves.png)")
    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, CHECKPOINT)
    for stale in glob.glob(glob.escape(ckpt) + ".tmp-*"):   # from a process killed mid-write
        os.remove(stale)
    ds = datasets.load(cfg.dataset)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    if cfg.batch_size < 1 or cfg.batch_size > len(x):
        raise ValueError(f"batch_size must be in 1..{len(x)} (the training set), got {cfg.batch_size}")
    init, apply = make_model(cfg, ds.x_train.shape[1:], ds.num_outputs)
    loss = make_loss(apply, ds.task, cfg.backward)
    steps_per_epoch = len(x) // cfg.batch_size
    opt = make_optimizer(cfg, cfg.epochs * steps_per_epoch)
    k_init, key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    if resume:
        state, history, saved = load_checkpoint(ckpt)
        # fields missing from an older checkpoint take their defaults; ``devices`` places the
        # same computation, so a run may resume on another number of devices
        saved = dataclasses.asdict(dataclasses.replace(Config(**saved), devices=cfg.devices))
        if saved != dataclasses.asdict(cfg):
            diff = {k: (saved.get(k), v) for k, v in dataclasses.asdict(cfg).items() if saved.get(k) != v}
            raise ValueError(f"--resume: the checkpoint in {out_dir} was written with another "
                             f"configuration (saved, now): {diff}")
    else:
        params = init(k_init)
        state, history = TrainState(params, opt.init(params), jnp.zeros((), jnp.int32)), []
    if mesh is None:
        epoch_fn = jax.jit(lambda s, k: train_epoch(loss, opt, s, x, y, k, cfg.batch_size, cfg.input_noise))
    else:  # data parallel: the batch split over the devices, the rest replicated
        state, x, y = distributed.replicate((state, x, y), mesh)
        dp_epoch = distributed.data_parallel_epoch(loss, opt, mesh, cfg.batch_size, cfg.input_noise)
        epoch_fn = lambda s, k: dp_epoch(s, x, y, k)
    eval_fn = jax.jit(lambda p, xs, ys: evaluate(apply, p, xs, ys, ds.task, cfg.backward))
    metric = "accuracy" if ds.task == "classification" else "rmse"
    bar = _progress(cfg.epochs, int(state.epoch), progress)
    try:
        while int(state.epoch) < cfg.epochs:
            t = time.perf_counter()
            new, losses = epoch_fn(state, jax.random.fold_in(key, int(state.epoch)))
            losses = np.asarray(losses)
            if not np.all(np.isfinite(losses)):
                bad = int(np.argmax(~np.isfinite(losses)))
                kept = (f"keeping the last good checkpoint {ckpt} (epoch {int(state.epoch)})"
                        if os.path.exists(ckpt) else "no epoch had finished, so no checkpoint")
                raise NonFiniteLoss(
                    f"the training loss became {losses[bad]} at step {int(state.epoch) * steps_per_epoch + bad + 1} "
                    f"(epoch {int(state.epoch) + 1}, batch {bad + 1}); stopped, {kept}. Try a smaller --lr.")
            state = new
            tr_loss, tr_metric = eval_fn(state.params, x, y)
            te_loss, te_metric = eval_fn(state.params, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))
            history.append({"epoch": int(state.epoch), "step_loss": float(losses.mean()),
                            "train_loss": float(tr_loss), f"train_{metric}": float(tr_metric),
                            "test_loss": float(te_loss), f"test_{metric}": float(te_metric),
                            "seconds": time.perf_counter() - t})
            save_checkpoint(ckpt, state, history, cfg)
            bar.update(1)
            bar.set_postfix(loss=f"{float(tr_loss):.4f}", **{f"test_{metric[:3]}": f"{float(te_metric):.4f}"})
    except KeyboardInterrupt:
        bar.close()
        save_checkpoint(ckpt, state, history, cfg)
        print(f"\ninterrupted: checkpoint of epoch {int(state.epoch)} saved to {ckpt}; "
              f"continue with --resume {out_dir}")
        raise
    finally:
        bar.close()
    metrics = {"config": dataclasses.asdict(cfg), "dataset": ds.name, "task": ds.task,
               "metric": metric, "epochs": history,
               "final": {k: v for k, v in history[-1].items() if k != "epoch"} if history else {},
               "seconds_total": time.perf_counter() - start, "device": jax.devices()[0].device_kind,
               "devices": cfg.devices}
    with open(os.path.join(out_dir, "metrics.json.tmp"), "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(os.path.join(out_dir, "metrics.json.tmp"), os.path.join(out_dir, "metrics.json"))
    _plot(history, metric, os.path.join(out_dir, "curves.png"), f"{cfg.model} on {ds.name}")
    return metrics


def _mesh(cfg: Config):
    """The data-parallel mesh of ``cfg.devices``, after checking that the batch splits evenly."""
    mesh = distributed.make_mesh(cfg.devices)
    distributed.check_batch_size(cfg.batch_size, mesh)
    return mesh


class _NoBar:
    """What ``_progress`` returns when there is no bar to draw."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, done: int, enabled: bool):
    """A tqdm bar over the epochs; no bar if disabled or tqdm is not installed."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=done, desc="epochs", unit="epoch", dynamic_ncols=True)


def _plot(history: list[dict], metric: str, path: str, title: str) -> None:
    """Loss and metric against epochs, train and test, as a PNG: matplotlib's object-oriented
    API (a ``Figure`` without pyplot), so no backend is selected and no global state changes."""
    import_optional("matplotlib", "drawing the training curves (curves.png)")
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 3.8))
    a, b = fig.subplots(1, 2)
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    a.plot(epochs, [h["test_loss"] for h in history], label="test")
    a.set(xlabel="epoch", ylabel="loss", yscale="log", title=f"{title}: loss")
    b.plot(epochs, [h[f"train_{metric}"] for h in history], label="train")
    b.plot(epochs, [h[f"test_{metric}"] for h in history], label="test")
    b.set(xlabel="epoch", ylabel=metric, title=f"{title}: {metric}")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)

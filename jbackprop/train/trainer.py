"""The loop behind ``jbackprop train``: epochs with a progress bar, an atomic checkpoint every
epoch, ``--resume``, a stop with a clear message on a non-finite loss or gradient (naming the
step, and the module where it started: ``jbackprop.check.locate_nonfinite``), Ctrl-C, and
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
from jbackprop.train.loop import (Config, TrainState, epoch_batches, evaluate, make_loss, make_model,
                                  make_optimizer, mini_batch, train_epoch, train_step)

CHECKPOINT = "checkpoint.pkl"


class NonFiniteLoss(RuntimeError):
    """The training loss, gradient or parameters became NaN or Inf; the last good checkpoint is
    kept. The message names the step and the module where it started."""


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
            epoch_key = jax.random.fold_in(key, int(state.epoch))
            new, losses = epoch_fn(state, epoch_key)
            losses = np.asarray(losses)
            if not (np.all(np.isfinite(losses)) and bool(_all_finite(new.params))):
                kept = (f"keeping the last good checkpoint {ckpt} (epoch {int(state.epoch)})"
                        if os.path.exists(ckpt) else "no epoch had finished, so no checkpoint")
                raise NonFiniteLoss(_non_finite_message(loss, opt, cfg, state, x, y, epoch_key,
                                                        losses, steps_per_epoch, kept))
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


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))


def _first_bad_step(loss, opt, cfg: Config, state: TrainState, x, y, key):
    """Re-run the epoch from ``state`` one jit-compiled step at a time, on the same mini-batches
    (``epoch_batches``, ``mini_batch``), and return ``(i, loss, gradient finite, params, xb,
    yb)`` of the first step whose loss, gradient or updated parameters are not finite
    (``params``: from before that step), or ``None``."""
    state, x, y = jax.tree.map(jnp.asarray, jax.device_get((state, x, y)))   # one device

    @jax.jit
    def step(params, opt_state, xb, yb):
        value, grads = jax.value_and_grad(loss)(params, xb, yb)
        new_params, opt_state, _ = train_step(loss, opt, params, opt_state, xb, yb)
        return new_params, opt_state, value, _all_finite(grads), _all_finite(new_params)
    batches, k_noise = epoch_batches(x.shape[0], key, cfg.batch_size)
    params, opt_state = state.params, state.opt_state
    for i in range(batches.shape[0]):
        xb, yb = mini_batch(x, y, batches[i], i, k_noise, cfg.input_noise)
        new_params, opt_state, value, grads_ok, params_ok = step(params, opt_state, xb, yb)
        if not (np.isfinite(value) and grads_ok and params_ok):
            return i, float(value), bool(grads_ok), params, xb, yb
        params = new_params
    return None


def _non_finite_message(loss, opt, cfg: Config, state: TrainState, x, y, key, losses,
                        steps_per_epoch: int, kept: str) -> str:
    """Which step of the epoch went non-finite, loss or gradient, and where in the modules
    (``locate_nonfinite`` on that step's loss, parameters and mini-batch, run eagerly)."""
    from jbackprop.check.nonfinite import locate_nonfinite
    bad, value, grads_ok, found = None, None, True, ""
    try:
        hit = _first_bad_step(loss, opt, cfg, state, x, y, key)
        if hit is None:
            found = " (re-running the epoch step by step did not reproduce it)"
        else:
            bad, value, grads_ok, params, xb, yb = hit
            found = (f"\n  In the forward and backward of that step's loss: "
                     f"{locate_nonfinite(loss, params, xb, yb, argnums=0)}.")
    except Exception as e:  # the diagnosis must never hide the stop itself
        found = f" (could not locate it: {type(e).__name__}: {e})"
    if bad is None and not np.all(np.isfinite(losses)):
        bad = int(np.argmax(~np.isfinite(losses)))
        value = losses[bad]
    epoch = int(state.epoch)
    if bad is None:
        what = f"the parameters became non-finite in epoch {epoch + 1}"
    else:
        what = (f"the training loss became {value}" if not np.isfinite(value) else
                f"the gradient became non-finite (the loss was finite, {value:.6g})"
                if not grads_ok else "the update made the parameters non-finite (the loss, "
                f"{value:.6g}, and the gradient were finite)")
        what += (f" at step {epoch * steps_per_epoch + bad + 1} (epoch {epoch + 1}, "
                 f"batch {bad + 1})")
    return f"{what}; stopped, {kept}.{found}\n  Try a smaller --lr."


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

"""The loop behind ``jbackprop train``: epochs with a progress bar, an atomic checkpoint every
epoch, ``--resume`` (also to extend a run to more epochs), a stop with a clear message on a
non-finite loss or gradient (naming the step, and the module where it started:
``jbackprop.check.locate_nonfinite``), Ctrl-C, and ``metrics.json`` and ``curves.png`` in the
output folder.

Checkpoints hold arrays and JSON, nothing that runs code when read: ``jbackprop.train.checkpoint``
(re-exported here).

It needs the ``cli`` extra (``pip install "jbackprop[cli]"``): matplotlib for the curves,
scikit-learn for the digits, tqdm for the progress bar (without it, no bar). Each is imported
only when used."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop._optional import import_optional
from jbackprop.train import data as datasets, distributed
from jbackprop.train.checkpoint import (CHECKPOINT, OLD_CHECKPOINT, checkpoint_metadata,  # noqa: F401
                                        existing_run, load_checkpoint, save_checkpoint)
from jbackprop.train.loop import (Config, TrainState, epoch_batches, evaluate, make_loss, make_model,
                                  make_optimizer, mini_batch, train_epoch, train_step)

class NonFiniteLoss(RuntimeError):
    """The training loss, gradient or parameters became NaN or Inf; the last good checkpoint is
    kept. The message names the step and the module where it started."""


class RunExists(ValueError):
    """A new run (no ``resume``) into a folder that holds another run's checkpoint, without
    ``overwrite``."""


def resume_conflicts(saved: dict, cfg: Config, done: int) -> dict:
    """The fields of ``cfg`` that a resume of a checkpoint with configuration ``saved`` (after
    ``done`` epochs) cannot take, as ``{field: (saved, now)}``. ``devices`` may change (the same
    computation, placed otherwise); ``epochs`` may be any number ≥ ``done`` (extending or
    shortening the run); a ``.npz`` dataset may be named by another path (``fit`` then checks
    that the arrays are the same). Fields missing from ``saved`` take their defaults."""
    saved = dataclasses.asdict(Config(**saved))
    now = dataclasses.asdict(cfg)
    out = {}
    for k, v in now.items():
        if k in ("devices", "model_parallel") or saved[k] == v:
            continue
        if k == "epochs" and v >= done:
            continue
        if k == "dataset" and saved[k].endswith(".npz") and v.endswith(".npz"):
            continue
        out[k] = (saved[k], v)
    return out


def fit(cfg: Config, out_dir: str, resume: bool = False, progress: bool = True,
        overwrite: bool = False) -> dict:
    """Train ``cfg`` and write ``metrics.json``, ``curves.png`` and checkpoints to ``out_dir``.

    Returns the metrics dict. Raises ``NonFiniteLoss`` (after keeping the last good checkpoint)
    and re-raises ``KeyboardInterrupt`` after saving one. Without matplotlib (the ``cli``
    extra) it raises ``ModuleNotFoundError`` at once, before training.

    A new run (``resume=False``) into a folder that holds a checkpoint raises ``RunExists``
    unless ``overwrite``: then the old checkpoint stays until the new run's first epoch
    replaces it (the old ``metrics.json``, ``curves.png`` and an older version's
    ``checkpoint.pkl`` are removed when training starts).

    ``resume=True`` continues the checkpoint in ``out_dir``. ``cfg`` must be its configuration
    except ``devices`` (any), ``epochs`` (at least the epochs done: more extends the run) and a
    ``.npz`` dataset's path (the same arrays at another path); anything else is a
    ``ValueError`` naming the fields, and so is a dataset whose arrays changed since the
    checkpoint (``data.fingerprint``). Extending a cosine schedule recomputes it for the new
    total of steps, continuing from the step reached (optax's step count is in the state): the
    learning rate rises again from where the shorter schedule had taken it; a constant
    schedule makes the extended run identical to one asked for with the larger ``epochs``.
    """
    start = time.perf_counter()
    mesh = _mesh(cfg) if cfg.devices != 1 or cfg.model_parallel != 1 else None  # refused first
    import_optional("matplotlib", "drawing the training curves (curves.png)")
    ckpt = os.path.join(out_dir, CHECKPOINT)
    old = existing_run(out_dir)
    if not resume and old and not overwrite:
        raise RunExists(f"{out_dir} already holds a run ({os.path.basename(old)}); continue it "
                        "with resume=True (--resume), or replace it with overwrite=True (--overwrite)")
    if resume:
        meta = checkpoint_metadata(ckpt)            # before anything is written or loaded
        conflicts = resume_conflicts(meta["config"], cfg, meta["epoch"])
        if conflicts:
            if list(conflicts) == ["epochs"]:
                raise ValueError(f"--resume: the checkpoint in {out_dir} has trained "
                                 f"{meta['epoch']} epoch{'s' * (meta['epoch'] != 1)}; epochs "
                                 f"must be at least that, got {cfg.epochs}")
            raise ValueError(f"--resume: the checkpoint in {out_dir} was written with another "
                             f"configuration (saved, now): {conflicts}")
    ds = datasets.load(cfg.dataset)
    fingerprint = datasets.fingerprint(ds)
    if resume and meta["dataset"]["sha256"] != fingerprint["sha256"]:
        was = meta["config"].get("dataset", Config.dataset)
        what = ("the dataset changed since the checkpoint" if was == cfg.dataset else
                f"the dataset {cfg.dataset} is not the checkpoint's {was}")
        raise ValueError(f"--resume: {what} in {out_dir}: {cfg.dataset} holds "
                         f"{datasets.describe(fingerprint)}; the checkpoint was trained on "
                         f"{datasets.describe(meta['dataset'])}; restore the data, or start a "
                         "new run")
    if resume:
        was = meta["config"].get("epochs", Config.epochs)
        print(f"resuming {out_dir} at epoch {meta['epoch']} of {cfg.epochs}: "
              f"{dataclasses.asdict(cfg)}")
        if cfg.epochs != was and cfg.schedule == "cosine":
            print(f"the cosine learning-rate schedule now decays over {cfg.epochs} epochs (it "
                  f"was {was}), from the step reached")
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    if cfg.batch_size < 1 or cfg.batch_size > len(x):
        raise ValueError(f"batch_size must be in 1..{len(x)} (the training set), got {cfg.batch_size}")
    if (ds.task == "sequence") != (cfg.model == "transformer"):
        raise ValueError(f"the {cfg.model} does not train on {ds.name} ({ds.task} task): the "
                         "transformer trains on sequences of token ids (--dataset sort), the "
                         "other models on feature vectors")
    if ds.task == "sequence" and cfg.input_noise:
        raise ValueError(f"input_noise must be 0 for token ids (the {ds.name} dataset), got "
                         f"{cfg.input_noise}")
    init, apply = make_model(cfg, ds.x_train.shape[1:], ds.num_outputs)
    os.makedirs(out_dir, exist_ok=True)     # the arguments and the data are good: work starts
    for stale in glob.glob(glob.escape(ckpt) + ".tmp-*"):   # from a process killed mid-write
        os.remove(stale)
    loss = make_loss(apply, ds.task, cfg.backward)
    steps_per_epoch = len(x) // cfg.batch_size
    opt = make_optimizer(cfg, cfg.epochs * steps_per_epoch)
    k_init, key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    if resume:
        state, history, _ = load_checkpoint(ckpt)
    else:
        params = init(k_init)
        state, history = TrainState(params, opt.init(params), jnp.zeros((), jnp.int32)), []
        if overwrite:      # the previous run's results; its checkpoint goes at the first save
            for name in ("metrics.json", "curves.png", OLD_CHECKPOINT):
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
    if mesh is None:
        epoch_fn = jax.jit(lambda s, k: train_epoch(loss, opt, s, x, y, k, cfg.batch_size, cfg.input_noise))
    elif cfg.model_parallel == 1:  # data parallel: the batch split, the rest replicated
        state, x, y = distributed.replicate((state, x, y), mesh)
        dp_epoch = distributed.data_parallel_epoch(loss, opt, mesh, cfg.batch_size, cfg.input_noise)
        epoch_fn = lambda s, k: dp_epoch(s, x, y, k)
    else:  # data × model: the MLP's layers (and Adam's moments) split over "model" as well
        shardings = distributed.state_shardings(
            state, mesh, distributed.mlp_shardings(jax.device_get(state.params), mesh))
        state = jax.device_put(state, shardings)
        x, y = distributed.replicate((x, y), mesh)
        mp_epoch = distributed.model_parallel_epoch(loss, opt, mesh, cfg.batch_size, shardings,
                                                    cfg.input_noise)
        epoch_fn = lambda s, k: mp_epoch(s, x, y, k)
    eval_fn = jax.jit(lambda p, xs, ys: evaluate(apply, p, xs, ys, ds.task, cfg.backward))
    metric = "rmse" if ds.task == "regression" else "accuracy"
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
            save_checkpoint(ckpt, _whole(state, mesh), history, cfg, fingerprint)
            bar.update(1)
            bar.set_postfix(loss=f"{float(tr_loss):.4f}", **{f"test_{metric[:3]}": f"{float(te_metric):.4f}"})
    except KeyboardInterrupt:
        bar.close()
        save_checkpoint(ckpt, _whole(state, mesh), history, cfg, fingerprint)
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
    """The ``(devices / model_parallel) × model_parallel`` mesh, after checking that the batch
    splits evenly and that the model can be split (the MLP, with hidden widths that
    ``model_parallel`` divides)."""
    if cfg.model_parallel > 1 and cfg.model != "mlp":
        raise ValueError(f"--model-parallel {cfg.model_parallel}: only --model mlp is split over "
                         f"devices (--model {cfg.model} trains data parallel: use --devices alone)")
    if cfg.model_parallel > 1 and cfg.width % cfg.model_parallel:
        raise ValueError(f"--model-parallel {cfg.model_parallel} must divide --width {cfg.width} "
                         f"(each device holds width / model-parallel hidden units)")
    mesh = distributed.make_mesh(cfg.devices, model=cfg.model_parallel)
    distributed.check_batch_size(cfg.batch_size, mesh)
    return mesh


def _whole(state: TrainState, mesh) -> TrainState:
    """``state`` with every leaf whole on every device (a no-op unless split over "model"), so
    that each process can write the checkpoint's arrays."""
    if mesh is None or mesh.shape[distributed.MODEL] == 1:
        return state
    return distributed.gather(state, mesh)


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

"""jbackprop.train and jbackprop.train.trainer: manual and autodiff runs agree, resume is
bit-identical, per-example gradients, Algorithm 1, NaN stop, checkpoints; ``python -m
jbackprop`` and the command line's defaults."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbackprop as jb
from jbackprop import cli, train
from jbackprop.train import trainer
from jbackprop.train import Config, TrainState
from helpers import assert_close

SMALL = dict(dataset="xor", width=16, epochs=3, batch_size=16, input_noise=0.1)


def _run_steps(cfg, dtype, steps=100):
    """``steps`` Adam steps from the same init and data, with ``cfg.backward``; returns losses."""
    from jbackprop.train import data
    ds = data.digits()
    x, y = jnp.asarray(ds.x_train, dtype), jnp.asarray(ds.y_train)
    init, apply = train.make_model(cfg, x.shape[1:], 10)
    loss = train.make_loss(apply, ds.task, cfg.backward)
    opt = train.make_optimizer(cfg, steps)
    params = jax.tree.map(lambda a: a.astype(dtype), init(jax.random.PRNGKey(0)))
    state = TrainState(params, opt.init(params), jnp.zeros((), jnp.int32))
    losses = []
    epoch = jax.jit(lambda s, k: train.train_epoch(loss, opt, s, x[:640], y[:640], k, 32, 0.3))
    for e in range(steps // 20):                  # 640 / 32 = 20 steps per epoch
        state, ls = epoch(state, jax.random.PRNGKey(e))
        losses.append(ls)
    return jnp.concatenate(losses), state.params


@pytest.mark.parametrize("model", ["mlp", "resnet-s", "cnn"])
def test_manual_and_autodiff_training_agree(model):
    """float32: losses equal to ~1e-5 relative after 100 steps; float64: to round-off."""
    cfg = Config(model=model, width=32, depth=2)
    auto = dataclasses.replace(cfg, backward="autodiff")
    for dtype, rel in ((jnp.float32, 1e-5), (jnp.float64, 1e-12)):
        l_manual, p_manual = _run_steps(cfg, dtype)
        l_auto, p_auto = _run_steps(auto, dtype)
        assert l_manual.shape == (100,)
        assert_close(l_manual, l_auto, rel, f"{model} {dtype.__name__} losses")
        if dtype == jnp.float64:
            assert_close(p_manual, p_auto, 1e-10, f"{model} float64 parameters")


def test_per_example_grads_match_a_loop_and_clip():
    params = jb.mlp_init(jax.random.PRNGKey(0), [4, 8, 3], jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
    y = jnp.array([0, 1, 2, 1, 0])
    loss = train.make_loss(jb.mlp, "classification", "manual")
    grads, norms = train.per_example_grads(loss, params, x, y)
    for i in range(5):
        gi = jax.grad(loss)(params, x[i:i + 1], y[i:i + 1])
        assert_close(jax.tree.map(lambda g: g[i], grads), gi)
    assert_close(jax.tree.map(lambda g: g.mean(0), grads), jax.grad(loss)(params, x, y))
    clipped, norms2 = train.per_example_grads(loss, params, x, y, clip_norm=0.1)
    assert_close(norms2, norms)
    new_norms = jnp.sqrt(sum(jnp.sum(g.reshape(5, -1) ** 2, 1) for g in jax.tree.leaves(clipped)))
    assert_close(new_norms, jnp.minimum(norms, 0.1))


def test_algorithm1_takes_plain_sgd_steps_on_single_examples():
    params = jb.mlp_init(jax.random.PRNGKey(0), [2, 4, 2], jnp.float64)
    x, y = jnp.array([[0.0, 1.0], [1.0, 0.0]]), jnp.array([1, 0])
    loss = train.make_loss(jb.mlp, "classification", "manual")
    key = jax.random.PRNGKey(3)
    out, losses = train.algorithm1(loss, params, x, y, key, 0.1, 3)
    p = params  # the same by hand: θ := θ − α ∇θ J^{(j)}(θ)
    for k in jax.random.split(key, 3):
        j = jax.random.randint(k, (), 0, 2)
        p = jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(loss)(p, x[j][None], y[j][None]))
    assert_close(out, p)
    assert losses.shape == (3,)


def test_make_model_and_optimizer_reject_bad_names():
    with pytest.raises(ValueError, match="unknown model"):
        train.make_model(Config(model="vgg"), (4,), 2)
    with pytest.raises(ValueError, match="backward must be"):
        train.make_model(Config(backward="magic"), (4,), 2)
    with pytest.raises(ValueError, match="unknown optimizer"):
        train.make_optimizer(Config(optimizer="lion"), 10)
    for name in ("sgd", "momentum", "adam"):
        assert isinstance(train.make_optimizer(Config(optimizer=name), 10), optax.GradientTransformation)


def test_fit_writes_metrics_curves_and_checkpoint(tmp_path):
    m = trainer.fit(Config(**SMALL), str(tmp_path), progress=False)
    assert len(m["epochs"]) == 3 and 0 <= m["final"]["test_accuracy"] <= 1
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config"]["dataset"] == "xor" and saved["epochs"][-1]["epoch"] == 3
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    state, history, cfg = trainer.load_checkpoint(str(tmp_path / trainer.CHECKPOINT))
    assert int(state.epoch) == 3 and len(history) == 3 and cfg == dataclasses.asdict(Config(**SMALL))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]   # no temporary files left


def test_resume_reaches_bit_identical_parameters(tmp_path):
    """Stop a run after 2 of 4 epochs (as Ctrl-C does: the checkpoint is saved), resume it,
    and compare with an uninterrupted run: every parameter and optimiser leaf bit for bit."""
    full = Config(**{**SMALL, "epochs": 4})
    trainer.fit(full, str(tmp_path / "full"), progress=False)
    _fit_epochs(full, str(tmp_path / "resumed"), 2)
    state, _, _ = trainer.load_checkpoint(str(tmp_path / "resumed" / trainer.CHECKPOINT))
    assert int(state.epoch) == 2
    trainer.fit(full, str(tmp_path / "resumed"), resume=True, progress=False)
    a, ha, _ = trainer.load_checkpoint(str(tmp_path / "full" / trainer.CHECKPOINT))
    b, hb, _ = trainer.load_checkpoint(str(tmp_path / "resumed" / trainer.CHECKPOINT))
    assert int(b.epoch) == 4 and [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _fit_epochs(cfg, out, n):
    """Run ``cfg`` but stop (as if killed) once ``n`` epochs are checkpointed."""
    real_save = trainer.save_checkpoint

    def save_then_maybe_stop(path, state, *args):
        real_save(path, state, *args)
        if int(state.epoch) >= n:
            raise KeyboardInterrupt
    trainer.save_checkpoint = save_then_maybe_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit(cfg, out, progress=False)
    finally:
        trainer.save_checkpoint = real_save


def test_non_finite_loss_in_the_first_epoch_leaves_no_checkpoint(tmp_path):
    cfg = Config(**{**SMALL, "lr": 1e30, "optimizer": "sgd", "epochs": 5, "input_noise": 0.0})
    with pytest.raises(trainer.NonFiniteLoss, match=r"at step \d+ \(epoch 1, batch \d+\); "
                                                   r"stopped, no epoch had finished"):
        trainer.fit(cfg, str(tmp_path), progress=False)
    assert not (tmp_path / trainer.CHECKPOINT).exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Two finite epochs, then a third whose steps turn the loss and the parameters into NaN
    (train_epoch poisoned from outside): the run stops naming the step, and the checkpoint on
    disk is epoch 2's, finite, equal to that of a run of 2 epochs."""
    real_epoch = trainer.train_epoch

    def poisoned(loss, opt, state, *args, **kwargs):
        new, losses = real_epoch(loss, opt, state, *args, **kwargs)
        bad = state.epoch >= 2
        params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new.params)
        return new._replace(params=params), jnp.where(bad, jnp.nan, losses)
    monkeypatch.setattr(trainer, "train_epoch", poisoned)
    cfg = Config(**{**SMALL, "epochs": 4, "schedule": "constant"})
    with pytest.raises(trainer.NonFiniteLoss, match=r"the training loss became nan at step 33 "
                                                   r"\(epoch 3, batch 1\); stopped, keeping the last "
                                                   r"good checkpoint .* \(epoch 2\)"):
        trainer.fit(cfg, str(tmp_path / "poisoned"), progress=False)
    ckpt = tmp_path / "poisoned" / trainer.CHECKPOINT
    assert ckpt.exists()
    state, history, _ = trainer.load_checkpoint(str(ckpt))
    assert int(state.epoch) == 2 and [h["epoch"] for h in history] == [1, 2]
    assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(state.params))
    trainer.fit(dataclasses.replace(cfg, epochs=2), str(tmp_path / "two"), progress=False)
    two, _, _ = trainer.load_checkpoint(str(tmp_path / "two" / trainer.CHECKPOINT))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(two), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_with_another_configuration_is_refused(tmp_path):
    trainer.fit(Config(**SMALL), str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        trainer.fit(Config(**{**SMALL, "lr": 0.5}), str(tmp_path), resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trainer.fit(Config(**SMALL), str(tmp_path / "nothing"), resume=True, progress=False)


def test_bad_batch_size(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be in 1..256"):
        trainer.fit(Config(**{**SMALL, "batch_size": 1000}), str(tmp_path), progress=False)


# --- the command line ----------------------------------------------------------------------------
def test_cli_defaults_are_config_defaults(monkeypatch, capsys):
    """``jbackprop train`` without flags trains ``Config()``; on another dataset without input
    noise. The help shows the defaults."""
    runs = []

    def fake_fit(cfg, out, resume=False, progress=True, overwrite=False):
        runs.append(cfg)
        return {"final": {"test_accuracy": 1.0}, "metric": "accuracy", "dataset": cfg.dataset,
                "seconds_total": 0.0}
    monkeypatch.setattr(trainer, "fit", fake_fit)
    assert cli.main(["train"]) == 0
    assert cli.main(["train", "--dataset", "xor", "--lr", "0.5"]) == 0
    assert runs == [Config(), Config(dataset="xor", lr=0.5, input_noise=0.0)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(Config):
        if f.name not in ("input_noise", "devices"):      # dataset-dependent / placement only
            assert f"default: {f.default}" in shown, f.name
    assert f"default {Config.input_noise} for digits" in shown


@pytest.mark.parametrize("args, expected", [
    (["--help"], "usage: jbackprop"),
    (["check", "--module", "relu", "--dtype", "float64"], "passed, 0 failed"),
], ids=["help", "check-relu"])
def test_python_dash_m_jbackprop(args, expected):
    """``python -m jbackprop`` is the ``jbackprop`` command."""
    run = subprocess.run([sys.executable, "-m", "jbackprop", *args], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and expected in run.stdout, run.stdout + run.stderr

"""jbackprop.check.nonfinite: ``locate_nonfinite`` names the module, leaf and chain step where a
finite cotangent first turns into NaN or Inf (or the forward, or code between modules), puts
every rule back as it was, and ``jbackprop train`` reports it when a loss or gradient goes
non-finite. The faults are planted: a small ``custom_vjp`` whose backward divides by zero, or a
library module's backward replaced for the duration of one test."""
import contextlib
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import jbackprop as jb
from jbackprop import train
from jbackprop._compat import set_custom_vjp_rules
from jbackprop.check import NonFiniteReport, locate_nonfinite
from jbackprop.check.nonfinite import _library_cores
from jbackprop.train import Config, data, trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


@jax.custom_vjp
def _scale(params, z):
    return params["s"] * z


def _scale_fwd(params, z):
    return _scale(params, z), (params, z)


def _scale_bwd(res, v):             # the planted mistake: divides by z - z = 0
    params, z = res
    return {"s": jnp.sum(v * z)}, v * params["s"] / (z - z)


_scale.defvjp(_scale_fwd, _scale_bwd)


def _params(key=0, n=4, m=3):
    k1, k2 = jax.random.split(jax.random.PRNGKey(key))
    return {"W": jax.random.normal(k1, (m, n)), "b": jax.random.normal(k2, (m,))}


X = jnp.linspace(-1.0, 1.0, 4)


@contextlib.contextmanager
def _planted(module, bad_bwd):
    """``module``'s backward replaced by ``bad_bwd(original, *args)`` inside the block."""
    core = module.core
    fwd, bwd = core.fwd, core.bwd
    core.bwd = lambda *args: bad_bwd(bwd, *args)
    try:
        yield
    finally:
        set_custom_vjp_rules(core, fwd, bwd)


def test_names_the_module_leaf_and_step_of_a_planted_backward(data_parallel_run):
    """Backward chain: layer_norm_s (1), scale (2, the fault), relu (3), mm (4)."""
    def f(p, s, x):
        return jnp.sum(jb.layer_norm_s(_scale(s, jb.relu(jb.mm(p, x)))) * jnp.arange(3.0))
    r = locate_nonfinite(f, _params(), {"s": jnp.float64(2.0)}, X, cores={"scale": _scale})
    assert (r.kind, r.module, r.leaves, r.step, r.steps) == ("backward", "scale", ("z",), 2, 4)
    assert [c.module for c in r.calls] == ["layer_norm_s", "scale", "relu", "mm"]
    assert [c.incoming_finite for c in r.calls] == [True, True, False, False]
    assert str(r) == ("non-finite cotangent first produced by the backward of `scale` for leaf "
                      "`z` at step 2 of 4 of the backward chain (its incoming cotangent was finite)")
    # Without being told about ``scale``, the fault lies between modules.
    r = locate_nonfinite(f, _params(), {"s": jnp.float64(2.0)}, X)
    assert r.kind == "outside" and "first backward to receive it was `relu` at step 2 of 3" in str(r)


def test_names_a_library_module_inside_a_composite_one():
    """MM's backward inside the residual block returns a NaN weight gradient: the innermost
    culprit (mm, step 3: residual 1, relu 2, mm2 3) is named, not the residual block."""
    params = {k: _params(i, 4, 4) for i, k in enumerate(("mm1", "mm2"))}
    with _planted(jb.mm, lambda bwd, res, v: ({**bwd(res, v)[0], "W": bwd(res, v)[0]["W"] / 0.0},
                                              bwd(res, v)[1])):
        r = locate_nonfinite(lambda p, x: jnp.sum(jb.residual(p, x) ** 2), params, X, argnums=0)
    assert (r.module, r.inside, r.leaves, r.step) == ("mm", "residual", ("params['W']",), 3)
    assert "backward of `mm` (inside the backward of `residual`) for leaf `params['W']`" in str(r)


def _xor_loss():
    """The loss, parameters and a mini-batch of ``jbackprop train --dataset xor --width 16
    --batch-size 16`` (the shapes of the training test below: its eager ops are compiled once)."""
    cfg = Config(dataset="xor", width=16)
    init, apply = train.make_model(cfg, (2,), 2)
    ds = data.xor()
    return train.make_loss(apply, ds.task, "manual"), init(jax.random.PRNGKey(0)), \
        jnp.asarray(ds.x_train[:16]), jnp.asarray(ds.y_train[:16])


def test_all_finite_mlp_loss():
    loss, params, x, y = _xor_loss()
    r = locate_nonfinite(loss, params, x, y)
    assert r.finite and isinstance(r, NonFiniteReport)
    assert [c.module for c in r.calls] == ["cross_entropy_loss", "mm", "relu", "mm", "relu", "mm"]
    assert all(all(c.leaves.values()) for c in r.calls) and "z" in r.calls[2].leaves
    assert str(r) == ("all cotangents are finite: the output, the 6 backward calls of jbackprop "
                      "modules and the gradient")


def test_forward_outside_input_and_cotangent_findings():
    p = _params()
    huge = {"W": jnp.full((3, 4), 1e200), "b": jnp.zeros(3)}
    r = locate_nonfinite(lambda p, x: jnp.sum(jb.relu(jb.mm(p, x))), huge, X + 1e200)
    assert (r.kind, r.module, r.step, r.steps) == ("forward", "mm", 1, 2)
    assert "first produced by the forward of `mm` at step 1 of 2" in str(r)
    # d sqrt(u)/du at u = 0 is infinite: user code between relu and the output.
    r = locate_nonfinite(lambda p, x: jnp.sum(jnp.sqrt(jb.relu(jb.mm(p, x)) * 0.0)), p, X)
    assert r.kind == "outside" and r.calls[0].module == "relu" and not r.calls[0].incoming_finite
    r = locate_nonfinite(lambda x: jnp.sum(jb.relu(x)), X.at[1].set(jnp.nan))
    assert (r.kind, r.leaves) == ("input", ("args[0]",))
    r = locate_nonfinite(lambda x: jb.relu(x), X, v=jnp.full(4, jnp.inf))
    assert r.kind == "cotangent"


def _rules():
    return {core: (core.fwd, core.bwd) for core in [*_library_cores(), _scale]}


def test_rules_are_restored_after_success_an_exception_and_nesting():
    before = _rules()

    def fails(p, x):
        jb.relu(jb.mm(p, x))
        raise ValueError("boom")
    with pytest.raises(ValueError, match="boom"):
        locate_nonfinite(fails, _params(), X, cores={"scale": _scale})
    inner = []

    def nests(p, x):      # a call inside a call: each records its own modules
        inner.append(locate_nonfinite(lambda z: jnp.sum(jb.tanh(z)), X))
        return jnp.sum(jb.relu(jb.mm(p, x)))
    outer = locate_nonfinite(nests, _params(), X, cores={"scale": _scale})
    assert [c.module for c in inner[0].calls] == ["tanh"]
    assert [c.module for c in outer.calls] == ["relu", "mm"]
    after = _rules()
    assert after.keys() == before.keys()
    for core, (fwd, bwd) in before.items():
        assert after[core][0] is fwd and after[core][1] is bwd, core


def test_train_names_the_module_when_a_gradient_goes_non_finite(tmp_path):
    """ReLU's backward divides by zero: the loss of step 1 is finite, its gradient is not (the
    loss only turns NaN at step 2). The stop names step 1, relu, its leaf and chain step."""
    cfg = Config(dataset="xor", width=16, epochs=2, batch_size=16, input_noise=0.0)
    with _planted(jb.relu, lambda bwd, res, v: (bwd(res, v)[0] / 0.0,)):
        with pytest.raises(trainer.NonFiniteLoss) as e:
            trainer.fit(cfg, str(tmp_path), progress=False)
    msg = str(e.value)
    assert msg.startswith("the gradient became non-finite (the loss was finite, ")
    assert "at step 1 (epoch 1, batch 1); stopped, no epoch had finished" in msg
    assert ("non-finite cotangent first produced by the backward of `relu` for leaf `z` at step 3 "
            "of 6 of the backward chain") in msg and "Try a smaller --lr." in msg


@pytest.fixture(scope="module")
def data_parallel_run(tmp_path_factory):
    """``jbackprop train --devices 2`` with a learning rate that overflows the weights, started
    in the background by the first test that asks (it runs while the others do)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = tmp_path_factory.mktemp("data_parallel")
    run = subprocess.Popen([sys.executable, "-m", "jbackprop", "train", "--devices", "2",
                            "--dataset", "xor", "--width", "16", "--batch-size", "16", "--epochs",
                            "1", "--optimizer", "sgd", "--lr", "1e30", "--no-progress", "--out",
                            str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env)
    yield run
    run.kill()
    run.communicate()


def test_cli_data_parallel_names_the_forward_module(data_parallel_run):
    """Data parallel over 2 devices: the second step's forward of mm overflows; the stop names
    the step and the module (exit status 3)."""
    stdout, stderr = data_parallel_run.communicate(timeout=300)
    assert data_parallel_run.returncode == 3, stdout + stderr
    assert "the training loss became nan at step 2 (epoch 1, batch 2)" in stderr, stderr
    assert "first produced by the forward of `mm` at step 3 of 6" in stderr, stderr

"""The optional columns of ``jbackprop bench`` (``jbackprop.bench.external``).

Equinox is a test dependency (pyproject's ``test`` extra), so CI builds and times its columns
(the MLPs, the classifier, the convolutional nets) and checks that they compute the
benchmark's mathematics. PyTorch and Flax are not (too large for CI): their tests run only where
they are installed, and without them their columns are simply absent, the library never
imported, the reason recorded (checked here whether or not they are installed).
"""
import math
import sys

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbackprop.bench import external, harness, models

# one configuration of each kind with an Equinox column (every convolutional one)
EQUINOX_CONFIGS = ["mlp-small", "xent-10k", "conv1d", "conv2d", "conv2d-pair"]


def _conv_params(conv):
    """``eqx.nn.Conv``'s ``weight (C', C, *K)``, ``bias (C', 1, …)`` as ``{"w": (*K, C, C'),
    "b": (C',)}``."""
    n = conv.weight.ndim - 2
    return {"w": jnp.transpose(conv.weight, (*range(2, 2 + n), 1, 0)),
            "b": conv.bias.reshape(-1)}


def _head_params(head, spec):
    """The head's weight reads the features flattened channels first, ``(C', *S)``; jbackprop
    flattens ``(*S, C')``: the same numbers, permuted."""
    n = head.weight.shape[0]
    w = head.weight.reshape(n, spec["channels"], *spec["shape"][:-1])
    return {"W": jnp.moveaxis(w, 1, -1).reshape(n, -1), "b": head.bias}


def _as_params(model, spec):
    """An Equinox model's (or its gradient's) layers as the configuration's parameters."""
    kind = spec["kind"]
    if kind == "conv":
        c1, c2 = _conv_params(model.conv1), _conv_params(model.conv2)
        head = _head_params(model.head, spec)
        if spec["layers"] == "pair":
            return (c1, (), c2, (), head)
        return (c1, {"beta": model.ln.bias, "gamma": model.ln.weight}, (), (c2, ()), (), head)
    layers = [{"W": layer.weight, "b": layer.bias}
              for layer in (model.layers if kind == "mlp" else [model])]
    return layers if kind == "mlp" else layers[0]


@pytest.mark.parametrize("name", EQUINOX_CONFIGS)
def test_equinox_column_computes_the_benchmark_loss_and_gradient(name):
    """The Equinox model, its weights put into the configuration's parameter layout, has the
    loss and gradient of every jbackprop version (hand-written backward, autodiff of the
    reference, batched, lax.conv), in float64. The convolutional nets take the batch channels
    first, as Equinox does."""
    problem = models.select([name])[0].build(True)
    model = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a,
                         external.equinox_model(problem.spec))
    x = problem.x.astype(jnp.float64)
    value, grads = eqx.filter_value_and_grad(external.equinox_loss)(
        model, external.equinox_input(problem.spec, x), problem.y)
    params = _as_params(model, problem.spec)
    assert jax.tree.structure(params) == jax.tree.structure(problem.params)
    for version, loss in problem.losses.items():
        expected = jax.value_and_grad(loss)(params, x, problem.y)
        chex.assert_trees_all_close((value, _as_params(grads, problem.spec)), expected,
                                    rtol=1e-10, atol=1e-12)


def test_bench_times_the_equinox_column():
    """``run_config`` with the external columns on (quick shapes, the minimum of rounds): the
    Equinox column is built, timed and recorded beside the jbackprop versions."""
    record = harness.run_config(models.select(["xent-10k"])[0], quick=True, budget_s=0.0,
                                external=True)
    assert "equinox" in record["versions"]
    step_ms = record["versions"]["equinox"]["step_ms"]
    assert math.isfinite(step_ms) and step_ms > 0
    assert harness.machine()["external"]["equinox"] == eqx.__version__


def test_missing_torch_gives_no_torch_column(monkeypatch):
    """Without PyTorch (simulated: ``import torch`` fails, as where it is not installed) the
    torch columns are absent and nothing fails; the Equinox one remains."""
    monkeypatch.setitem(sys.modules, "torch", None)
    assert external.available()["torch"] is None
    problem = models.select(["mlp-small"])[0].build(True)
    steps = external.steps(problem.spec, np.asarray(problem.x), np.asarray(problem.y))
    assert set(steps) == {"equinox"}
    jax.block_until_ready(steps["equinox"]())


def test_bench_times_the_equinox_conv_column():
    """A convolutional configuration gets its Equinox column, timed beside the jbackprop
    versions and the lax.conv baseline; a library without a column says why."""
    record = harness.run_config(models.select(["conv2d-pair"])[0], quick=True, budget_s=0.0,
                                external=True)
    assert {"manual", "autodiff", "lax.conv", "equinox"} <= set(record["versions"])
    assert math.isfinite(record["versions"]["equinox"]["step_ms"])
    assert "equinox" not in record["external_skipped"]
    for lib in ("torch", "flax"):
        assert (lib in record["versions"] or lib + " eager" in record["versions"]) \
            == (lib not in record["external_skipped"])


def test_skipped_columns_say_why(monkeypatch):
    """Not installed (simulated for Flax), or no model for the kind (Equinox and layer norm)."""
    monkeypatch.setitem(sys.modules, "flax", None)
    ln = models.select(["layernorm-net"])[0].build(True).spec
    why = external.skipped(ln)
    assert why["flax"] == "not installed"
    assert why["equinox"] == "no equinox model for a 'ln' configuration"
    assert "equinox" not in external.skipped(models.select(["conv1d"])[0].build(True).spec)
    with pytest.raises(ValueError, match="no Equinox model"):
        external.equinox_model(ln)


def _flax_as_params(variables, spec):
    """Flax's ``{"params": {conv1, ln, conv2, head}}`` as the configuration's parameters
    (``nn.Conv``'s kernel is jbackprop's ``(*K, C, C')``; ``nn.Dense``'s is ``Wᵀ``)."""
    p = variables["params"]
    conv = lambda q: {"w": q["kernel"], "b": q["bias"]}
    head = {"W": p["head"]["kernel"].T, "b": p["head"]["bias"]}
    if spec["layers"] == "pair":
        return (conv(p["conv1"]), (), conv(p["conv2"]), (), head)
    ln = {"beta": p["ln"]["bias"], "gamma": p["ln"]["scale"]}
    return (conv(p["conv1"]), ln, (), (conv(p["conv2"]), ()), (), head)


@pytest.mark.parametrize("name", ["conv1d", "conv2d", "conv2d-pair"])
def test_flax_conv_column_where_installed(name):
    """Runs only where Flax is installed (not a test dependency): the Flax model, its weights in
    the configuration's layout, has jbackprop's loss and gradient in float64, and its step runs."""
    pytest.importorskip("flax", reason="Flax is not installed (not a test dependency)")
    problem = models.select([name])[0].build(True)
    x = problem.x.astype(jnp.float64)
    model = external.flax_model(problem.spec)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64),
                             model.init(jax.random.PRNGKey(0), x))
    value, grads = jax.value_and_grad(external.flax_loss, 1)(model, variables, x, problem.y)
    params = _flax_as_params(variables, problem.spec)
    expected = jax.value_and_grad(problem.losses["manual"])(params, x, problem.y)
    chex.assert_trees_all_close((value, _flax_as_params(grads, problem.spec)), expected,
                                rtol=1e-10, atol=1e-12)
    steps = external.steps(problem.spec, problem.x, problem.y)
    jax.block_until_ready(steps["flax"]())


def test_torch_columns_where_installed():
    """Runs only where PyTorch is installed (it is not a test dependency: too large for CI)."""
    pytest.importorskip("torch", reason="PyTorch is not installed (not a test dependency)")
    problem = models.select(["mlp-small"])[0].build(True)
    steps = external.steps(problem.spec, np.asarray(problem.x), np.asarray(problem.y))
    assert {"torch eager", "torch.compile", "equinox"} <= set(steps)
    for step in steps.values():
        step()

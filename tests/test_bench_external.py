"""The optional columns of ``jbackprop bench`` (``jbackprop.bench.external``).

Equinox is a test dependency (pyproject's ``test`` extra), so CI builds and times its column and
checks that it computes the benchmark's mathematics. PyTorch is not (too large for CI): its
test runs only where torch is installed, and without it the torch columns are simply absent,
torch never imported (checked here whether or not torch is installed).
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

EQUINOX_CONFIGS = ["mlp-small", "xent-10k"]   # the configuration kinds with an Equinox column


def _as_params(model, kind):
    """An Equinox model's (or its gradient's) layers as the configuration's parameters."""
    layers = [{"W": layer.weight, "b": layer.bias}
              for layer in (model.layers if kind == "mlp" else [model])]
    return layers if kind == "mlp" else layers[0]


@pytest.mark.parametrize("name", EQUINOX_CONFIGS)
def test_equinox_column_computes_the_benchmark_loss_and_gradient(name):
    """The Equinox model, its weights put into the configuration's parameter layout, has the
    loss and gradient of every jbackprop version (hand-written backward, autodiff of the
    reference, batched), in float64."""
    problem = models.select([name])[0].build(True)
    kind = problem.spec["kind"]
    model = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a,
                         external.equinox_model(problem.spec))
    x = problem.x.astype(jnp.float64)
    value, grads = eqx.filter_value_and_grad(external.equinox_loss)(model, x, problem.y)
    params = _as_params(model, kind)
    for version, loss in problem.losses.items():
        expected = jax.value_and_grad(loss)(params, x, problem.y)
        chex.assert_trees_all_close((value, _as_params(grads, kind)), expected,
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


def test_no_column_for_convolutional_configurations():
    problem = models.select(["conv1d"])[0].build(True)
    assert external.steps(problem.spec, np.asarray(problem.x), np.asarray(problem.y)) == {}
    with pytest.raises(ValueError, match="no Equinox model"):
        external.equinox_model(problem.spec)


def test_torch_columns_where_installed():
    """Runs only where PyTorch is installed (it is not a test dependency: too large for CI)."""
    pytest.importorskip("torch", reason="PyTorch is not installed (not a test dependency)")
    problem = models.select(["mlp-small"])[0].build(True)
    steps = external.steps(problem.spec, np.asarray(problem.x), np.asarray(problem.y))
    assert {"torch eager", "torch.compile", "equinox"} <= set(steps)
    for step in steps.values():
        step()

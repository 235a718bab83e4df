"""The checker at the scales and structures where a leaf-normalised error, a step from
``max|x|`` or a dropped argument fooled it (issue 12's examples): each wrong backward below is
caught, each correct module passes, in float32 and float64."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from jbackprop.check import verify_vjp
from planted import MM_ARGS, cube_abs, cube_reference, mm_per_example_data_first

DTYPES = ["float32", "float64"]


def normal(seed, *shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64)


@pytest.mark.parametrize("dtype, with_reference", [("float32", True), ("float64", False)])
def test_a_200_percent_error_on_one_small_element_is_caught(dtype, with_reference):
    """z³/3 with backward z|z|v at z = [1e4, −1, 3e3]: wrong only at −1, where the gradient is 1
    next to 10⁸; the report names that element with both values."""
    z = jnp.array([1e4, -1.0, 3e3], dtype)
    report = verify_vjp(cube_abs, z, reference=cube_reference if with_reference else None)
    assert not report.passed
    (leaf,) = report.leaves
    evidence = leaf.autodiff if with_reference else leaf.finite_differences
    assert evidence.worst_index == (1,) and evidence.error > 0.1
    assert evidence.expected == pytest.approx(-evidence.actual, rel=1e-4)


@jax.custom_vjp
def stepped_mm(params, z):
    return params["W"] @ z


stepped_mm.defvjp(lambda p, z: (stepped_mm(p, z), (p, z)),
                  lambda res, v: ({"W": 2 * jnp.outer(v, res[1]), "step": None},  # BUG: 2·
                                  res[0]["W"].T @ v))


@pytest.mark.parametrize("argnums", [None, (0, 1)])
def test_an_integer_leaf_does_not_hide_its_argument(argnums):
    """params = {"W", "step": int}: W is still checked (and its 2· caught), step is listed as
    not differentiated, and argnums=(0, 1) does not crash."""
    params = {"W": normal(1, 2, 3), "step": jnp.asarray(3)}
    report = verify_vjp(stepped_mm, params, normal(2, 3),
                        reference=lambda p, z: p["W"] @ z, argnums=argnums)
    rows = {leaf.leaf: leaf for leaf in report.leaves}
    assert set(rows) == {"params['W']", "params['step']", "z"}
    assert not rows["params['W']"].passed and rows["z"].passed
    assert rows["params['step']"].passed and "not differentiated" in rows["params['step']"].note
    integers = next(c for c in report.checks if c.key == "integer_leaves")
    assert integers.passed and not integers.skipped and "params['step']" in integers.note
    assert "params['step']" in report.to_json()


def test_the_argument_order_cannot_hide_a_forgotten_batch():
    """Mistake (j) written as fn(z, params): batched alone, z runs the module's batched core."""
    report = verify_vjp(mm_per_example_data_first, *MM_ARGS[::-1],
                        reference=lambda z, p: ref.mm(p, z), checks=("vmap",))
    vmap = report.checks[0]
    assert not vmap.passed and "batching arguments (0,)" in vmap.note


def _pixels_mlp(dtype):
    params = jb.mlp_init(jax.random.PRNGKey(0), [64, 32, 10], jnp.float64)
    x = jnp.round(255 * jax.random.uniform(jax.random.PRNGKey(1), (64,), jnp.float64))
    return jax.tree.map(lambda a: a.astype(dtype), (params, x))


OFFSET_CASES = {
    "layer_norm_s at 100 + N(0,1)": (jb.layer_norm_s, ref.layer_norm_s, lambda: (100 + normal(3, 8),)),
    "layer_norm_s at 1e3 + N(0,1)": (jb.layer_norm_s, ref.layer_norm_s, lambda: (1e3 + normal(3, 8),)),
    "cross_entropy at logits 1e4 + N(0,1)": (jb.cross_entropy_loss, ref.cross_entropy_loss,
                                             lambda: (1e4 + normal(4, 10), jnp.asarray(3))),
    "mlp on raw 0–255 pixels": (jb.mlp, ref.mlp, None),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OFFSET_CASES))
def test_correct_modules_pass_at_large_offsets(name, dtype):
    """Steps from the function's behaviour, errors against each element's local scale: correct
    modules pass far from the origin, with and without a reference."""
    fn, reference, make = OFFSET_CASES[name]
    args = _pixels_mlp(dtype) if make is None else jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, make())
    for r in (reference, None):
        report = verify_vjp(fn, *args, reference=r)
        assert report.passed, "\n".join(report.failures())


def test_a_wrong_layer_norm_at_an_offset_is_still_caught():
    """The local scale does not excuse a wrong derivative: layer norm's backward without the
    x̂ mean(v x̂) term fails at 1e3 + N(0, 1) in float32 and float64."""
    from planted import layer_norm_s_no_xhat_term
    for dtype in DTYPES:
        z = (1e3 + normal(3, 8)).astype(dtype)
        report = verify_vjp(layer_norm_s_no_xhat_term, z, reference=ref.layer_norm_s)
        assert not report.leaves[0].autodiff.passed and not report.leaves[0].finite_differences.passed

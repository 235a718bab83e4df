"""Batch norm beyond the registry's cases (tests/test_registry.py verifies ``jb.batch_norm`` on a
batch, ``axis_name=None``, in float32 and float64, both modes): per example under
``jax.vmap(..., axis_name=...)`` with the collectives in the hand-written rules, the closed
form of the backward, per-example gradients, second order, the layer, finiteness and bad input.
Every comparison is against the pure-jnp reference (``lax.pmean`` where it is vmapped)
differentiated by JAX, float64 finite differences, or NumPy from the definitions."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from jbackprop.modules import combinators, normalisation
from jbackprop.testing import assert_jvp_correct, assert_vjp_correct
from helpers import assert_close

N, M = 6, 4
AXIS = "batch"


def _data(shape=(N, M), seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {"beta": jax.random.normal(k1, (shape[-1],)),
              "gamma": 1.0 + 0.5 * jax.random.normal(k2, (shape[-1],))}
    return params, 2.0 * jax.random.normal(k3, shape) + 0.7


def per_example(bn, eps=1e-5):
    """``bn`` applied one example at a time under ``jax.vmap`` named ``AXIS``."""
    return lambda p, z: jax.vmap(lambda x: bn(p, x, eps=eps, axis_name=AXIS),
                                 axis_name=AXIS)(z)


@pytest.mark.parametrize("shape", [(N, M), (N, 3, M)], ids=["examples (m,)", "examples (3, m)"])
def test_named_vmap_through_the_checker(shape):
    """Per example under ``jax.vmap(axis_name=...)``: every check of the library's checker in
    both modes (autodiff of the vmapped reference, finite differences, Taylor, adjoint
    identity, jit, vmap, reverse-over-reverse), with a local leading axis or without."""
    params, z = _data(shape)
    fn, reference = per_example(jb.batch_norm, eps=0.01), per_example(ref.batch_norm, eps=0.01)
    assert_vjp_correct(fn, params, z, reference=reference, name=f"batch_norm vmap {shape}")
    assert_jvp_correct(fn, params, z, reference=reference, name=f"batch_norm vmap {shape}")


def test_named_vmap_equals_the_batch():
    """The per-example form and the batch form compute the same function and gradients; both
    equal the reference on the batch, differentiated by JAX."""
    params, z = _data()
    w = jax.random.normal(jax.random.PRNGKey(5), z.shape)
    loss = lambda bn: lambda p, z: jnp.sum(w * jnp.sin(bn(p, z)))
    expected = jax.grad(loss(ref.batch_norm), (0, 1))(params, z)
    for fn in (jb.batch_norm, per_example(jb.batch_norm)):
        assert_close(fn(params, z), ref.batch_norm(params, z), what="forward")
        assert_close(jax.jit(jax.grad(loss(fn), (0, 1)))(params, z), expected, what="gradient")


def test_per_example_gradients_run_the_rules_with_collectives():
    """``vmap(grad)`` of a per-example loss: each example's ``z̄`` gathers every example's ``v``
    through ``lax.pmean`` in the hand-written backward, as JAX's transpose of the reference's
    collectives does; the spy shows the hand-written backward ran."""
    params, z = _data()
    w = jax.random.normal(jax.random.PRNGKey(6), z.shape)

    def grads(bn):
        loss = lambda p, x, wi: jnp.sum(wi * jnp.sin(bn(p, x, axis_name=AXIS)))
        return jax.vmap(jax.grad(loss, (0, 1)), (None, 0, 0), axis_name=AXIS)(params, z, w)
    calls, bwd = [], normalisation._batch_norm.bwd
    normalisation._batch_norm.bwd = lambda *a: calls.append(1) or bwd(*a)
    try:
        got = grads(jb.batch_norm)
    finally:
        normalisation._batch_norm.bwd = bwd
    assert calls, "jax.grad did not run the hand-written backward"
    assert_close(got, grads(ref.batch_norm), what="per-example gradients")


def test_backward_closed_form():
    """B[BN, z](v) = (γ/σ̂)(v − mean v − x̂ mean(v ⊙ x̂)) over the batch, B[BN, γ](v) = Σ v ⊙ x̂,
    B[BN, β](v) = Σ v, in NumPy from the definitions (two-pass variance, divide by N)."""
    eps = 0.1
    params, Z = _data((N, 3, M))
    V = jax.random.normal(jax.random.PRNGKey(7), Z.shape)
    p_bar, z_bar = jb.backward(jb.batch_norm)(params, Z, V, eps=eps)
    z, v, gamma = np.asarray(Z), np.asarray(V), np.asarray(params["gamma"])
    mu = z.mean((0, 1))
    sigma = np.sqrt(((z - mu) ** 2).mean((0, 1)) + eps)
    xhat = (z - mu) / sigma
    mean = lambda a: a.mean((0, 1))
    expected = gamma / sigma * (v - mean(v) - xhat * mean(v * xhat))
    np.testing.assert_allclose(z_bar, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(p_bar["gamma"], (v * xhat).sum((0, 1)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(p_bar["beta"], v.sum((0, 1)), rtol=1e-12, atol=1e-12)


def test_hessian_under_named_vmap():
    """Forward over reverse through the collectives: ``jax.hessian`` of a loss of the
    per-example form equals the reference's, to 1e-10 (float64)."""
    params, z = _data((4, 3))
    loss = lambda bn: lambda z: jnp.sum(jnp.sin(per_example(bn)(params, z)) ** 2)
    assert_close(jax.hessian(loss(jb.batch_norm))(z), jax.hessian(loss(ref.batch_norm))(z),
                 rel=1e-10, what="hessian")


def test_unnamed_vmap_gives_independent_batches():
    """``jax.vmap`` (unnamed) over a stack of batches normalises each batch on its own."""
    params, z = _data((3, N, M))
    got = jax.vmap(lambda zz: jb.batch_norm(params, zz))(z)
    assert_close(got, jnp.stack([ref.batch_norm(params, zz) for zz in z]), what="groups")


def test_layer_trains_under_named_vmap():
    """``combinators.BatchNorm`` in a ``serial`` model, applied under ``jax.vmap`` named as the
    layer's axis: the gradient equals that of the reference layers. (The Dense before it has
    no bias: batch norm removes any shift, so that bias's gradient is zero, round-off only.)"""
    def model(reference):
        return combinators.serial(combinators.Dense(5, bias=False, reference=reference),
                                  combinators.BatchNorm(AXIS, reference=reference),
                                  combinators.Activation(jb.tanh, reference=reference),
                                  combinators.Dense(2, reference=reference))
    x = jax.random.normal(jax.random.PRNGKey(8), (N, M), jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          model(False).init(jax.random.PRNGKey(9), (M,)))

    def loss(reference):
        apply = jax.vmap(model(reference).apply, (None, 0), axis_name=AXIS)
        return lambda p: jnp.sum(apply(p, x) ** 2)
    assert_close(jax.grad(loss(False))(params), jax.grad(loss(True))(params), what="layer")


def test_constant_feature_is_finite():
    """A feature constant over the batch (ε > 0): output β, γ̄ = 0, finite z̄ = 0 there."""
    params, z = _data()
    z = z.at[:, 1].set(3.0)
    y = jb.batch_norm(params, z)
    p_bar, z_bar = jax.grad(lambda p, z: jnp.sum(jnp.sin(jb.batch_norm(p, z))), (0, 1))(params, z)
    np.testing.assert_allclose(y[:, 1], params["beta"][1], rtol=1e-12)
    assert np.isfinite(z_bar).all() and abs(float(p_bar["gamma"][1])) < 1e-12
    np.testing.assert_allclose(z_bar[:, 1], 0.0, atol=1e-9)


def test_float32_runs_with_float32_statistics():
    """float32 and bfloat16 inputs: output dtypes follow the inputs; float32 within 1e-5 of the
    float64 reference at the same numbers."""
    params, z = _data()
    p32, z32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, z))
    y = jax.jit(per_example(jb.batch_norm))(p32, z32)
    assert y.dtype == jnp.float32
    assert_close(y, ref.batch_norm(*jax.tree.map(lambda a: a.astype(jnp.float64), (p32, z32))),
                 rel=1e-5, what="float32")
    assert jb.batch_norm(*jax.tree.map(lambda a: a.astype(jnp.bfloat16), (params, z))).dtype \
        == jnp.bfloat16


@pytest.mark.parametrize("call, match", [
    (lambda p, z: jb.batch_norm(p, z[0]), r"z of shape \(4,\) has no batch"),
    (lambda p, z: jb.batch_norm(p, z[:0]), r"z of shape \(0, 4\) has no batch"),
    (lambda p, z: jb.batch_norm(p, z, axis_name="nope"), r"axis_name='nope' is not the name"),
    (lambda p, z: jax.vmap(lambda x: jb.batch_norm(p, x))(z), r"has no batch.*axis_name=name"),
    (lambda p, z: jb.batch_norm({"beta": p["beta"][:2], "gamma": p["gamma"]}, z),
     r"params\['beta'\] must have shape \(4,\).*got \(2,\)"),
    (lambda p, z: jb.batch_norm(p, z, eps=-1.0), "eps"),
], ids=["one example", "empty batch", "unbound axis", "vmap without name", "beta shape", "eps"])
def test_bad_input(call, match):
    """Each a ValueError naming the argument, raised at trace time (also under ``jax.jit``)."""
    params, z = _data()
    with pytest.raises(ValueError, match=match):
        call(params, z)
    with pytest.raises(ValueError, match=match):
        jax.jit(call)(params, z)


def test_eval_with_fixed_statistics_is_an_affine_layer():
    """The documented evaluation recipe: with fixed μ, σ² (e.g. of the training set),
    ``β + γ (z − μ)/sqrt(σ² + ε)`` is ``layer_norm``-free affine arithmetic; folded into
    ``γ' = γ/sqrt(σ² + ε)``, ``β' = β − γ' μ``, it reproduces training-mode output when the
    batch's statistics are those fixed ones."""
    params, z = _data()
    mu, var = z.mean(0), z.var(0)
    scale = params["gamma"] / jnp.sqrt(var + 1e-5)
    chex.assert_trees_all_close(params["beta"] - scale * mu + scale * z,
                                jb.batch_norm(params, z), rtol=1e-12, atol=1e-12)

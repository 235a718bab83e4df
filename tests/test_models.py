import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from helpers import assert_close, check_module


def _res_params(m=5, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {f"mm{i}": {"W": jax.random.normal(ks[2 * i - 2], (m, m)) / 2,
                       "b": jax.random.normal(ks[2 * i - 1], (m,))} for i in (1, 2)}


@pytest.mark.parametrize("activation, reference", [
    (jb.relu, ref.relu), (jb.tanh, ref.tanh), (jb.sigmoid, ref.sigmoid),
    (functools.partial(jb.leaky_relu, gamma=0.2), functools.partial(ref.leaky_relu, gamma=0.2)),
    (jb.gelu, ref.gelu)])   # the first σ's backward from h1 (all but GELU), or its own residual
def test_residual_against_reference(activation, reference):
    z = jnp.array([0.3, -1.2, 0.8, 2.0, -0.4])
    p = _res_params()
    check_module(jb.residual, lambda p, z, activation: ref.residual(p, z, reference),
                 (p, z), kwargs={"activation": activation}, batch=(1,))


def test_residual_backward_is_v_plus_inner():
    """B[Res, z](v) = v + B[inner, z](v), with B[inner] from autodiff of the reference inner map."""
    p, z, v = _res_params(), jnp.linspace(-1, 1, 5), jnp.arange(5.0) - 2
    inner = lambda z: ref.relu(ref.mm(p["mm2"], ref.relu(ref.mm(p["mm1"], z))))
    _, z_bar = jb.backward(jb.residual)(p, z, v)
    assert_close(z_bar, v + jax.vjp(inner, z)[1](v)[0])


def test_residual_rejects_non_module_activation():
    with pytest.raises(TypeError, match="activation must be a jbackprop module"):
        jb.residual(_res_params(), jnp.ones(5), activation=jax.nn.relu)
    with pytest.raises(ValueError, match=r"must be square \(4, 4\)"):
        jb.residual(_res_params(), jnp.ones(4))
    with pytest.raises(ValueError, match="keys \\['mm1', 'mm2'\\]"):
        jb.residual({"mm1": _res_params()["mm1"]}, jnp.ones(5))


def test_mlp_init_parameter_count():
    d, sizes = 7, [7, 16, 8, 3]
    params = jb.mlp_init(jax.random.PRNGKey(0), sizes)
    count = sum(x.size for x in jax.tree.leaves(params))
    assert count == (d + 1) * 16 + (16 + 1) * 8 + (8 + 1) * 3
    with pytest.raises(ValueError, match="sizes"):
        jb.mlp_init(jax.random.PRNGKey(0), [3])


@pytest.mark.parametrize("activation, reference", [(jb.relu, ref.relu), (jb.gelu, ref.gelu)])
def test_mlp_against_reference(activation, reference):
    params = jb.mlp_init(jax.random.PRNGKey(1), [5, 8, 6, 3], jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(2), (5,))
    check_module(jb.mlp, lambda p, x, activation: ref.mlp(p, x, reference), (params, x),
                 kwargs={"activation": activation}, batch=(1,), check_jaxpr=False)


def test_resnet_s_against_reference():
    params = jb.resnet_s_init(jax.random.PRNGKey(3), 4, 6, 3, 2, jnp.float64)
    params["blocks"]["mm2"]["W"] *= 4  # make the blocks matter
    x = jax.random.normal(jax.random.PRNGKey(4), (4,))
    check_module(jb.resnet_s, ref.resnet_s, (params, x), batch=(1,), check_jaxpr=False)
    assert "proj" not in jb.resnet_s_init(jax.random.PRNGKey(3), 6, 6, 2, 2)


def _cross_entropy_batch(model, params, X, Y):
    return jnp.mean(jax.vmap(lambda x, y: ref.cross_entropy_loss(model(params, x), y))(X, Y))


@pytest.mark.parametrize("name", ["mlp", "resnet_s"])
def test_model_batch_gradients_match_autodiff(name):
    """A training-style loss: mean cross-entropy over a vmapped batch."""
    key = jax.random.PRNGKey(5)
    if name == "mlp":
        params, model, reference = jb.mlp_init(key, [6, 16, 16, 4], jnp.float64), jb.mlp, ref.mlp
    else:
        params, model, reference = jb.resnet_s_init(key, 6, 8, 4, 4, jnp.float64), jb.resnet_s, ref.resnet_s
    X = jax.random.normal(jax.random.PRNGKey(6), (10, 6))
    Y = jnp.arange(10) % 4
    g = jax.jit(jax.grad(functools.partial(_cross_entropy_batch, model)))(params, X, Y)
    assert_close(g, jax.grad(functools.partial(_cross_entropy_batch, reference))(params, X, Y))
    per = jax.vmap(jax.grad(lambda p, x, y: jb.cross_entropy_loss(model(p, x), y)), (None, 0, 0))
    per_ref = jax.vmap(jax.grad(lambda p, x, y: ref.cross_entropy_loss(reference(p, x), y)),
                       (None, 0, 0))
    assert_close(jax.jit(per)(params, X, Y), per_ref(params, X, Y))


def test_resnet_s_jaxpr_does_not_grow_with_depth():
    """The blocks run in lax.scan: the traced program is the same size at depth 8 and 512
    (compile time is measured in benchmarks/compile_depth.py)."""
    def size(depth):
        params = jax.eval_shape(lambda: jb.resnet_s_init(jax.random.PRNGKey(0), 8, 8, depth, 2))
        x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
        loss = lambda p, x: jnp.sum(jax.vmap(lambda x: jb.resnet_s(p, x))(x))
        jaxpr = jax.make_jaxpr(jax.grad(loss))(params, x)
        return len(str(jaxpr).splitlines())
    assert size(512) == size(8)


def test_resnet_s_deep_forward_is_finite():
    params = jb.resnet_s_init(jax.random.PRNGKey(0), 8, 16, 512, 3)
    out = jax.jit(jax.vmap(lambda x: jb.resnet_s(params, x)))(jnp.ones((2, 8)))
    assert bool(jnp.all(jnp.isfinite(out)))


def test_checkpointed_model_gradients():
    params = jb.mlp_init(jax.random.PRNGKey(1), [5, 8, 3], jnp.float64)
    x = jnp.linspace(-1, 1, 5)
    g = jax.grad(lambda p: jnp.sum(jax.checkpoint(jb.mlp)(p, x) ** 2))(params)
    assert_close(g, jax.grad(lambda p: jnp.sum(ref.mlp(p, x) ** 2))(params))


def test_float32_and_bfloat16_models():
    params = jb.mlp_init(jax.random.PRNGKey(1), [5, 8, 3])
    X = jax.random.normal(jax.random.PRNGKey(2), (4, 5), jnp.float32)
    loss = lambda m: lambda p, X: jnp.sum(jax.vmap(lambda x: m(p, x))(X) ** 2)
    g = jax.jit(jax.grad(loss(jb.mlp)))(params, X)
    assert g[0]["W"].dtype == jnp.float32
    p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    assert_close(g, jax.grad(loss(ref.mlp))(p64, X.astype(jnp.float64)), 1e-5)
    pb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    gb = jax.jit(jax.grad(loss(jb.mlp)))(pb, X.astype(jnp.bfloat16))
    assert all(l.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(gb))

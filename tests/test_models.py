"""Models beyond the registry's cases (tests/test_registry.py verifies the residual block, the
MLP and ResNet-S, with a projection, all with ReLU, in float32 and float64): other
activations, ResNet-S without a projection, training-style batch losses, depth, checkpointing,
dtypes and bad input."""
import functools

import chex
import jax
import jax.numpy as jnp
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from jbackprop.testing import assert_vjp_correct
from helpers import U32, cast, max_abs

F64 = {"rtol": 1e-10, "atol": 1e-10}   # float64: hand-written vs autodiff of the reference


def _res_params(m=5, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {f"mm{i}": {"W": jax.random.normal(ks[2 * i - 2], (m, m)) / 2,
                       "b": jax.random.normal(ks[2 * i - 1], (m,))} for i in (1, 2)}


@pytest.mark.parametrize("activation, reference", [
    (jb.tanh, ref.tanh), (jb.sigmoid, ref.sigmoid),
    (functools.partial(jb.leaky_relu, gamma=0.2), functools.partial(ref.leaky_relu, gamma=0.2)),
    (jb.gelu, ref.gelu)], ids=["tanh", "sigmoid", "leaky_relu", "gelu"])
def test_residual_other_activations(activation, reference):
    """The first σ's backward from its output h1 (all but GELU), or from its own residual
    (GELU), through the library's checker; ReLU is the registry's."""
    z = jnp.array([0.3, -1.2, 0.8, 2.0, -0.4])
    assert_vjp_correct(functools.partial(jb.residual, activation=activation), _res_params(), z,
                       reference=lambda p, z: ref.residual(p, z, reference), name="residual")


def test_residual_backward_is_v_plus_inner():
    """B[Res, z](v) = v + B[inner, z](v), with B[inner] from autodiff of the reference inner map."""
    p, z, v = _res_params(), jnp.linspace(-1, 1, 5), jnp.arange(5.0) - 2
    inner = lambda z: ref.relu(ref.mm(p["mm2"], ref.relu(ref.mm(p["mm1"], z))))
    _, z_bar = jb.backward(jb.residual)(p, z, v)
    chex.assert_trees_all_close(z_bar, v + jax.vjp(inner, z)[1](v)[0], **F64)


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


def test_mlp_with_gelu():
    """The MLP with another activation than the registry's ReLU, through the checker."""
    params = jb.mlp_init(jax.random.PRNGKey(1), [5, 8, 6, 3], jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(2), (5,))
    assert_vjp_correct(functools.partial(jb.mlp, activation=jb.gelu), params, x,
                       reference=lambda p, x: ref.mlp(p, x, ref.gelu), name="mlp gelu")


def test_resnet_s_without_projection():
    """Input width = block width: ``resnet_s_init`` gives no ``proj`` (the registry's examples
    all have one), and the model starts with the blocks; through the checker."""
    params = jb.resnet_s_init(jax.random.PRNGKey(3), 6, 6, 3, 2, jnp.float64)
    assert set(params) == {"blocks", "head"}
    params["blocks"]["mm2"]["W"] *= 4  # make the blocks matter
    x = jax.random.normal(jax.random.PRNGKey(4), (6,))
    assert_vjp_correct(jb.resnet_s, params, x, reference=ref.resnet_s, name="resnet_s, no proj")


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
    chex.assert_trees_all_close(
        g, jax.grad(functools.partial(_cross_entropy_batch, reference))(params, X, Y), **F64)
    per = jax.vmap(jax.grad(lambda p, x, y: jb.cross_entropy_loss(model(p, x), y)), (None, 0, 0))
    per_ref = jax.vmap(jax.grad(lambda p, x, y: ref.cross_entropy_loss(reference(p, x), y)),
                       (None, 0, 0))
    chex.assert_trees_all_close(jax.jit(per)(params, X, Y), per_ref(params, X, Y), **F64)


def test_resnet_s_jaxpr_does_not_grow_with_depth():
    """The blocks run in lax.scan: the traced program is the same size at depth 8 and 512
    (compile time is measured in benchmarks/compile_depth.py)."""
    def size(depth):
        params = jax.eval_shape(lambda: jb.resnet_s_init(jax.random.PRNGKey(0), 8, 8, depth, 2))
        x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
        loss = lambda p, x: jnp.sum(jax.vmap(lambda x: jb.resnet_s(p, x))(x))
        return _equations(jax.make_jaxpr(jax.grad(loss))(params, x).jaxpr)
    assert size(512) == size(8)


def _equations(jaxpr) -> int:
    """Equations of a jaxpr, those of its sub-jaxprs (scan bodies, custom rules) included: the
    program's size, independent of how JAX's printer wraps lines."""
    subs = lambda eqn: [getattr(p, "jaxpr", p) for p in eqn.params.values()
                        if hasattr(getattr(p, "jaxpr", p), "eqns")]
    return sum(1 + sum(_equations(j) for j in subs(e)) for e in jaxpr.eqns)


def test_resnet_s_deep_forward_is_finite():
    params = jb.resnet_s_init(jax.random.PRNGKey(0), 8, 16, 512, 3)
    out = jax.jit(jax.vmap(lambda x: jb.resnet_s(params, x)))(jnp.ones((2, 8)))
    assert bool(jnp.all(jnp.isfinite(out)))


def test_checkpointed_model_gradients():
    params = jb.mlp_init(jax.random.PRNGKey(1), [5, 8, 3], jnp.float64)
    x = jnp.linspace(-1, 1, 5)
    g = jax.grad(lambda p: jnp.sum(jax.checkpoint(jb.mlp)(p, x) ** 2))(params)
    chex.assert_trees_all_close(g, jax.grad(lambda p: jnp.sum(ref.mlp(p, x) ** 2))(params), **F64)


def test_float32_and_bfloat16_models():
    """A float32 MLP's gradient against the exact one (the float64 reference's at the same
    float32 numbers), to a tolerance of float32 round-offs; bfloat16 runs and stays finite."""
    params = jb.mlp_init(jax.random.PRNGKey(1), [5, 8, 3])
    X = jax.random.normal(jax.random.PRNGKey(2), (4, 5), jnp.float32)
    loss = lambda m: lambda p, X: jnp.sum(jax.vmap(lambda x: m(p, x))(X) ** 2)
    g = jax.jit(jax.grad(loss(jb.mlp)))(params, X)
    chex.assert_type(jax.tree.leaves(g), jnp.float32)
    exact = jax.grad(loss(ref.mlp))(*cast((params, X), jnp.float64))
    # Each gradient entry is a sum over the batch (4) of products through two layers of at
    # most 8 + 5 terms each: 64 round-offs of the gradient's scale bound its float32 error.
    chex.assert_trees_all_close(g, exact, rtol=0, atol=64 * U32 * max_abs(exact))
    pb = cast(params, jnp.bfloat16)
    gb = jax.jit(jax.grad(loss(jb.mlp)))(pb, X.astype(jnp.bfloat16))
    chex.assert_type(jax.tree.leaves(gb), jnp.bfloat16)
    assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(gb))

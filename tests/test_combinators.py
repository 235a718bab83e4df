import chex
import jax
import jax.numpy as jnp
import pytest

import jbackprop as jb
from jbackprop.modules import combinators as cb
from jbackprop import reference as ref

F64 = {"rtol": 1e-10, "atol": 1e-10}   # float64: hand-written vs autodiff of the reference


def test_serial_shapes_and_params():
    net = cb.serial(cb.Dense(8), cb.Relu, cb.Dense(3))
    params = net.init(jax.random.PRNGKey(0), (5,))
    chex.assert_shape([params[0]["W"], params[2]["W"]], [(8, 5), (3, 8)])
    assert params[1] == ()
    chex.assert_shape(net.apply(params, jnp.ones(5)), (3,))
    with pytest.raises(ValueError, match="expected params for 3 layers"):
        net.apply(params[:2], jnp.ones(5))


def test_residual_combinator_is_z_plus_f():
    inner = cb.serial(cb.Dense(4), cb.Tanh)
    block = cb.Residual(inner)
    p = block.init(jax.random.PRNGKey(1), (4,))
    z = jnp.linspace(-1, 1, 4)
    chex.assert_trees_all_close(block.apply(p, z), z + inner.apply(p, z), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="must keep the shape"):
        cb.Residual(cb.Dense(3)).init(jax.random.PRNGKey(1), (4,))


@pytest.mark.parametrize("conv, in_shape", [("1d", (12, 2)), ("2d", (6, 5, 2))])
def test_conv_net_gradients_match_reference(conv, in_shape):
    net = jb.conv_net(channels=4, k=3, num_classes=3, conv=conv)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), net.init(jax.random.PRNGKey(2), in_shape))
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(9), a.shape), params)
    cref = {"1d": ref.conv1d, "2d": ref.conv2d}[conv]

    def reference(p, x):  # the same network written with the pure-jnp references only
        p_c1, p_ln, _, (p_c2, _), _, p_out = p
        h = ref.relu(ref.layer_norm(p_ln, cref(p_c1, x)))
        h = h + ref.relu(cref(p_c2, h))
        return ref.mm(p_out, h.reshape(-1))

    X = jax.random.normal(jax.random.PRNGKey(3), (3, *in_shape))
    loss = lambda f: lambda p: jnp.sum(jnp.sin(jax.vmap(lambda x: f(p, x))(X)))
    chex.assert_trees_all_close(jax.vmap(lambda x: net.apply(params, x))(X),
                                jax.vmap(lambda x: reference(params, x))(X), **F64)
    chex.assert_trees_all_close(jax.jit(jax.grad(loss(net.apply)))(params),
                                jax.grad(loss(reference))(params), **F64)


def test_conv_layer_rejects_wrong_input_rank():
    with pytest.raises(ValueError, match="Conv1D expects"):
        cb.Conv1D(4).init(jax.random.PRNGKey(0), (5,))

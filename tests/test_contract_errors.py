"""Inputs that once gave NaN, a raw JAX error or a silent wrong answer: each now gives the right
answer or a clear ``ValueError``/``TypeError`` naming the argument, at trace time."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref


# --- concrete labels out of range: a ValueError also under jit ------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda t: jb.cross_entropy_loss(t, 7), r"y must be in 0\.\.2.*\[7\]"),
    (lambda t: jb.cross_entropy_loss(jnp.stack([t, t]), np.array([0, 3])), r"y must be in 0\.\.2.*\[3\]"),
    (lambda t: jb.logistic_loss(t[0], 2), r"y must be in \[0, 1\].*\[2\]"),
    (lambda t: jb.logistic_loss(t, np.array([0.0, 1.0, -1.0])), r"y must be in \[0, 1\].*\[-1\.0\]"),
])
def test_concrete_labels_out_of_range_raise_under_jit(call, match):
    t = jnp.ones(3)
    with pytest.raises(ValueError, match=match):
        call(t)
    with pytest.raises(ValueError, match=match):
        jax.jit(call)(t)


def test_traced_labels_out_of_range_give_nan_as_documented():
    """A label that is an argument of the jitted function is traced: it cannot be checked at
    trace time; that example's loss and gradient are NaN (docs/losses.md)."""
    t = jnp.asarray([0.5, -1.0, 2.0])
    loss = jax.jit(jb.cross_entropy_loss)(t, jnp.int32(7))
    grad = jax.jit(jax.grad(jb.cross_entropy_loss))(t, jnp.int32(7))
    assert math.isnan(float(loss)) and bool(jnp.all(jnp.isnan(grad)))
    assert math.isnan(float(jax.jit(jb.logistic_loss)(t[0], jnp.int32(2))))
    ok = jax.jit(jb.cross_entropy_loss)(t, jnp.int32(2))
    chex.assert_trees_all_close(ok, ref.cross_entropy_loss(t, 2), rtol=1e-12)


# --- hyper-parameters: finite, in range, named ----------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda z: jb.softplus(z, beta=math.inf), r"beta must be a finite number > 0, got inf"),
    (lambda z: jb.softplus(z, beta=0.0), r"beta must be a finite number > 0, got 0"),
    (lambda z: jb.elu(z, alpha=math.inf), r"alpha must be a finite number ≥ 0, got inf"),
    (lambda z: jb.elu(z, alpha=math.nan), r"alpha must be a finite number ≥ 0, got nan"),
    (lambda z: jb.leaky_relu(z, gamma=math.nan), r"gamma must be a finite number in \(0, 1\], got nan"),
    (lambda z: jb.leaky_relu(z, gamma=2.0), r"gamma must be a finite number in \(0, 1\], got 2"),
    (lambda z: jb.layer_norm_s(z, eps=math.inf), r"eps must be a finite number ≥ 0, got inf"),
    (lambda z: jb.layer_norm_s(z, eps=-1.0), r"eps must be a finite number ≥ 0, got -1"),
])
def test_non_finite_or_out_of_range_hyper_parameters_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.ones(3))


# --- empty signals: the right (empty and zero) answer ---------------------------------------------
@pytest.mark.parametrize("name, params, z, batched", [
    ("conv1d_s", {"w": jnp.ones(3), "b": jnp.ones(())}, jnp.ones(0), False),
    ("conv1d", {"w": jnp.ones((3, 2, 4)), "b": jnp.ones(4)}, jnp.ones((0, 2)), False),
    ("conv1d", {"w": jnp.ones((3, 2, 4)), "b": jnp.ones(4)}, jnp.ones((0, 5, 2)), True),  # no examples
    ("conv2d", {"w": jnp.ones((3, 3, 2, 4)), "b": jnp.ones(4)}, jnp.ones((0, 5, 2)), False),
])
def test_convolution_of_an_empty_signal_and_its_gradient(name, params, z, batched):
    fn, r = getattr(jb, name), getattr(ref, name)
    r = jax.vmap(r, (None, 0)) if batched else r
    chex.assert_trees_all_equal(fn(params, z), r(params, z))
    J = lambda f: lambda p, z: jnp.sum(f(p, z))
    got, expected = jax.grad(J(fn), (0, 1))(params, z), jax.grad(J(r), (0, 1))(params, z)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, expected)
    chex.assert_trees_all_close(got, expected)           # zeros: no term touches the weights


# --- model parameters of the wrong kind --------------------------------------------------------------
@pytest.mark.parametrize("call, exc, match", [
    (lambda x: jb.mlp({"W": jnp.ones((2, 3))}, x), TypeError, r"mlp: params must be a non-empty list.*dict"),
    (lambda x: jb.mlp([], x), TypeError, r"mlp: params must be a non-empty list.*empty list"),
    (lambda x: jb.resnet_s({"head": {"W": jnp.ones((2, 3))}}, x), ValueError,
     r"resnet_s: params must be a dict with keys \['blocks', 'head'\].*got \['head'\]"),
    (lambda x: jb.resnet_s([{"W": jnp.ones((2, 3))}], x), ValueError, r"resnet_s: params must be a dict.*list"),
])
def test_model_parameters_of_the_wrong_kind(call, exc, match):
    with pytest.raises(exc, match=match):
        call(jnp.ones(3))


# --- the notes-form backward: v of the wrong shape is named --------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda: jb.backward(jb.mm)({"W": jnp.ones((2, 3))}, jnp.ones(3), jnp.ones(5)),
     r"mm.backward: v \(the upstream gradient\) must have the shape of the module's output, "
     r"\(2,\) float64; got v \(5,\)"),
    (lambda: jb.backward(jb.relu)(jnp.ones(3), jnp.ones((3, 1))), r"relu.backward: v .*\(3,\).*got v \(3, 1\)"),
    (lambda: jb.mm.vjp({"W": jnp.ones((2, 3))}, jnp.ones(3))[1](jnp.ones(3)), r"mm.backward: v"),
])
def test_backward_with_a_wrongly_shaped_v_names_v(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_backward_casts_cotangents_to_their_arguments_dtypes():
    p = {"W": jnp.ones((2, 3), jnp.float32)}
    p_bar, z_bar = jb.backward(jb.mm)(p, jnp.ones(3), jnp.ones(2, jnp.float32))
    chex.assert_type([p_bar["W"], z_bar], [jnp.float32, jnp.float64])
    chex.assert_trees_all_close(p_bar["W"], jnp.ones((2, 3), jnp.float32))
    with pytest.raises(TypeError, match="v must be floating-point"):
        jb.backward(jb.relu)(jnp.ones(3), jnp.ones(3, jnp.int32))

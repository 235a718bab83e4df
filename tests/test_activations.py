import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from helpers import assert_close, check_module

# Inputs avoid the kinks at 0 for finite differences; kinks are tested separately below.
Z = jnp.array([[1.3, -2.1, 0.4], [-0.7, 2.5, -0.05]])
CASES = [
    (jb.relu, ref.relu, {}), (jb.sigmoid, ref.sigmoid, {}), (jb.tanh, ref.tanh, {}),
    (jb.leaky_relu, ref.leaky_relu, {}), (jb.leaky_relu, ref.leaky_relu, {"gamma": 0.1}),
    (jb.gelu, ref.gelu, {}), (jb.gelu, ref.gelu, {"approximate": True}),
    (jb.softplus, ref.softplus, {}), (jb.softplus, ref.softplus, {"beta": 3.0}),
    (jb.elu, ref.elu, {}), (jb.elu, ref.elu, {"alpha": 0.5}),
]
IDS = [f"{f.__name__}-{kw}" for f, _, kw in CASES]


@pytest.mark.parametrize("fn, reference, kw", CASES, ids=IDS)
def test_activation_against_reference(fn, reference, kw):
    check_module(fn, reference, (Z,), kwargs=kw, batch=(0,))


@pytest.mark.parametrize("fn, reference, kw", CASES, ids=IDS)
def test_activation_any_shape(fn, reference, kw):
    for z in (jnp.float64(0.3), jnp.linspace(-2, 2, 24).reshape(2, 3, 4)):
        assert_close(fn(z, **kw), reference(z, **kw), 1e-12)
        g = jax.grad(lambda z: jnp.sum(jnp.sin(fn(z, **kw))))(z)
        assert_close(g, jax.grad(lambda z: jnp.sum(jnp.sin(reference(z, **kw))))(z))


def test_relu_worked_example():
    """The lecture: ReLU on x = [1, −2, 3, −1] with upstream [4, −1, 5, 9] gives [4, 0, 5, 0]."""
    (z_bar,) = jb.backward(jb.relu)(jnp.array([1.0, -2, 3, -1]), jnp.array([4.0, -1, 5, 9]))
    np.testing.assert_array_equal(z_bar, [4.0, 0.0, 5.0, 0.0])


def test_kinks_follow_the_spec():
    """σ'(0): ReLU 0 (as jax.nn.relu), leaky ReLU γ, ELU 1 (z ≥ 0 branch)."""
    z = jnp.zeros(3)
    assert_close(jax.grad(lambda z: jb.relu(z).sum())(z), jnp.zeros(3))
    assert_close(jax.grad(lambda z: jb.relu(z).sum())(z), jax.grad(lambda z: jax.nn.relu(z).sum())(z))
    assert_close(jax.grad(lambda z: jb.leaky_relu(z, gamma=0.2).sum())(z), jnp.full(3, 0.2))
    assert_close(jax.grad(lambda z: jb.elu(z, alpha=0.5).sum())(z), jnp.ones(3))


def test_derivatives_closed_forms():
    z = jnp.linspace(-3, 3, 13)
    s = 1 / (1 + np.exp(-np.asarray(z)))
    g = lambda f, **kw: jax.grad(lambda z: f(z, **kw).sum())(z)
    assert_close(g(jb.sigmoid), s * (1 - s))
    assert_close(g(jb.tanh), 1 - np.tanh(np.asarray(z)) ** 2)
    assert_close(g(jb.softplus, beta=2.0), 1 / (1 + np.exp(-2 * np.asarray(z))))
    from scipy.stats import norm
    assert_close(g(jb.gelu), norm.cdf(z) + np.asarray(z) * norm.pdf(z))


@pytest.mark.parametrize("fn", [jb.sigmoid, jb.tanh, jb.softplus, jb.gelu, jb.elu])
def test_large_inputs_stay_finite(fn):
    z = jnp.array([-1e3, -50.0, 50.0, 1e3])
    out, g = fn(z), jax.grad(lambda z: fn(z).sum())(z)
    assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(jnp.isfinite(g)))
    z32 = z.astype(jnp.float32)
    assert bool(jnp.all(jnp.isfinite(jax.grad(lambda z: fn(z).sum())(z32))))
    huge = jnp.array([-3e38, -1e20, 1e20, 3e38], jnp.float32)   # z³ overflows in the tanh form
    assert bool(jnp.all(jnp.isfinite(jax.grad(lambda z: jb.gelu(z, approximate=True).sum())(huge))))
    # softplus with a large β must not overflow either
    assert bool(jnp.all(jnp.isfinite(jax.grad(lambda z: jb.softplus(z, beta=50.0).sum())(z32))))


@pytest.mark.parametrize("fn, reference, kw", CASES, ids=IDS)
def test_low_precision(fn, reference, kw):
    z32 = Z.astype(jnp.float32)
    g = jax.grad(lambda z: jnp.sum(fn(z, **kw) ** 2))(z32)
    assert g.dtype == jnp.float32
    assert_close(g, jax.grad(lambda z: jnp.sum(reference(z, **kw) ** 2))(Z), 1e-5)
    gb = jax.jit(jax.grad(lambda z: jnp.sum(fn(z, **kw) ** 2)))(Z.astype(jnp.bfloat16))
    assert gb.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(gb)))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: jb.relu(jnp.ones(3, jnp.int32)), TypeError, "z must be a floating"),
    (lambda: jb.sigmoid("x"), TypeError, "z must be a floating"),
    (lambda: jb.leaky_relu(jnp.ones(3), gamma=1.5), ValueError, "gamma must be in"),
    (lambda: jb.leaky_relu(jnp.ones(3), gamma=0.0), ValueError, "gamma must be in"),
    (lambda: jb.leaky_relu(jnp.ones(3), gamma=jnp.float32(0.1)), TypeError, "gamma must be a Python"),
    (lambda: jb.softplus(jnp.ones(3), beta=0.0), ValueError, "beta must be in"),
    (lambda: jb.softplus(jnp.ones(3), beta=-1.0), ValueError, "beta must be in"),
    (lambda: jb.elu(jnp.ones(3), alpha=-1.0), ValueError, "alpha must be in"),
    (lambda: jb.gelu(jnp.ones(3), approximate="tanh"), TypeError, "approximate must be a bool"),
    (lambda: jb.backward(jax.nn.relu), TypeError, "not a jbackprop module"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("fn, reference, kw", CASES, ids=IDS)
def test_backward_from_output(fn, reference, kw):
    """Where σ' is a function of σ, ``backward_from_output(σ)(σ(z), v)`` is autodiff's
    ``(∂σ/∂z)ᵀ v`` of the reference; otherwise (GELU, softplus, ELU) there is none."""
    import functools
    from jbackprop.activations import backward_from_output
    back = backward_from_output(functools.partial(fn, **kw) if kw else fn)
    if fn in (jb.gelu, jb.softplus, jb.elu):
        assert back is None
        return
    v = jnp.array([[0.3, -1.2, 2.0], [1.5, 0.7, -0.4]])
    expected = jax.vjp(lambda z: reference(z, **kw), Z)[1](v)[0]
    assert_close(back(reference(Z, **kw), v), expected, 1e-12)

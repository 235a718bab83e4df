"""Activations beyond the registry's cases (tests/test_registry.py verifies each at its
declared hyper-parameters — leaky ReLU γ = 0.1, softplus β = 2, ELU α = 0.7, both GELU forms —
in float32 and float64): the other hyper-parameters (the defaults among them), scalars, kinks,
closed forms, large inputs, low precision, bad input and ``derivative_from_output``."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from jbackprop.modules import registry
from jbackprop.modules.activations import derivative_from_output
from jbackprop.testing import assert_vjp_correct
from helpers import U32, cast

F64 = {"rtol": 1e-12, "atol": 1e-12}   # float64: hand-written vs autodiff of the reference
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
# The settings above that the registry does not verify: the defaults γ = 0.01, β = 1, α = 1
# (where ELU's derivative is continuous at 0), and β = 3, α = 0.5.
UNDECLARED = [case for case in CASES if case[2] not in registry.of(case[0]).hyper]


@pytest.mark.parametrize("fn, reference, kw", UNDECLARED,
                         ids=[f"{f.__name__}-{kw}" for f, _, kw in UNDECLARED])
def test_undeclared_hyper_parameters_against_reference(fn, reference, kw):
    """The library's checker (autodiff of the reference, float64 finite differences, Taylor,
    adjoint, linearity, jit, vmap, reverse-over-reverse) at hyper-parameters outside the
    registry."""
    assert_vjp_correct(functools.partial(fn, **kw), Z,
                       reference=functools.partial(reference, **kw), name=f"{fn.__name__}{kw}")


@pytest.mark.parametrize("fn, reference, kw", CASES, ids=IDS)
def test_activation_any_shape(fn, reference, kw):
    """A scalar (no registry example is one) and a 3-d array: forward and gradient."""
    for z in (jnp.float64(0.3), jnp.linspace(-2, 2, 24).reshape(2, 3, 4)):
        out = fn(z, **kw)
        chex.assert_shape(out, z.shape)
        chex.assert_trees_all_close(out, reference(z, **kw), **F64)
        g = jax.grad(lambda z: jnp.sum(jnp.sin(fn(z, **kw))))(z)
        chex.assert_trees_all_close(g, jax.grad(lambda z: jnp.sum(jnp.sin(reference(z, **kw))))(z),
                                    **F64)


def test_relu_worked_example():
    """The lecture: ReLU on x = [1, −2, 3, −1] with upstream [4, −1, 5, 9] gives [4, 0, 5, 0]."""
    (z_bar,) = jb.backward(jb.relu)(jnp.array([1.0, -2, 3, -1]), jnp.array([4.0, -1, 5, 9]))
    np.testing.assert_array_equal(z_bar, [4.0, 0.0, 5.0, 0.0])


def test_kinks_follow_the_spec():
    """σ'(0): ReLU 0 (as jax.nn.relu), leaky ReLU γ, ELU 1 (z ≥ 0 branch)."""
    z = jnp.zeros(3)
    grad = lambda f: jax.grad(lambda z: f(z).sum())(z)
    chex.assert_trees_all_equal(grad(jb.relu), jnp.zeros(3))
    chex.assert_trees_all_equal(grad(jb.relu), grad(jax.nn.relu))
    chex.assert_trees_all_equal(grad(functools.partial(jb.leaky_relu, gamma=0.2)), jnp.full(3, 0.2))
    chex.assert_trees_all_equal(grad(functools.partial(jb.elu, alpha=0.5)), jnp.ones(3))


def test_derivatives_closed_forms():
    z = jnp.linspace(-3, 3, 13)
    s = 1 / (1 + np.exp(-np.asarray(z)))
    g = lambda f, **kw: jax.grad(lambda z: f(z, **kw).sum())(z)
    chex.assert_trees_all_close(g(jb.sigmoid), s * (1 - s), **F64)
    chex.assert_trees_all_close(g(jb.tanh), 1 - np.tanh(np.asarray(z)) ** 2, **F64)
    chex.assert_trees_all_close(g(jb.softplus, beta=2.0), 1 / (1 + np.exp(-2 * np.asarray(z))),
                                **F64)
    from scipy.stats import norm
    chex.assert_trees_all_close(g(jb.gelu), norm.cdf(z) + np.asarray(z) * norm.pdf(z), **F64)


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
    """Float32 cotangents within a few float32 round-offs of the exact ones (the float64
    reference's at the same float32 numbers); bfloat16 runs and stays finite."""
    z32 = Z.astype(jnp.float32)
    g = jax.grad(lambda z: jnp.sum(fn(z, **kw) ** 2))(z32)
    chex.assert_type(g, jnp.float32)
    g64 = jax.grad(lambda z: jnp.sum(reference(z, **kw) ** 2))(cast(z32, jnp.float64))
    # 2σ(z)σ'(z): a handful of elementary functions and products, each correctly rounded to a
    # few ulps; 64 round-offs of |g| (and of max|g| near its zeros) is a wide margin for that.
    chex.assert_trees_all_close(g, g64, rtol=64 * U32, atol=64 * U32 * float(jnp.max(jnp.abs(g64))))
    gb = jax.jit(jax.grad(lambda z: jnp.sum(fn(z, **kw) ** 2)))(Z.astype(jnp.bfloat16))
    chex.assert_type(gb, jnp.bfloat16)
    assert bool(jnp.all(jnp.isfinite(gb)))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: jb.relu(jnp.ones(3, jnp.int32)), TypeError, "z must be a floating"),
    (lambda: jb.sigmoid("x"), TypeError, "z must be a floating"),
    (lambda: jb.leaky_relu(jnp.ones(3), gamma=1.5), ValueError, r"gamma must be .* in \(0, 1\]"),
    (lambda: jb.leaky_relu(jnp.ones(3), gamma=0.0), ValueError, r"gamma must be .* in \(0, 1\]"),
    (lambda: jb.leaky_relu(jnp.ones(3), gamma=jnp.float32(0.1)), TypeError, "gamma must be a Python"),
    (lambda: jb.softplus(jnp.ones(3), beta=0.0), ValueError, "beta must be a finite number > 0"),
    (lambda: jb.softplus(jnp.ones(3), beta=-1.0), ValueError, "beta must be a finite number > 0"),
    (lambda: jb.elu(jnp.ones(3), alpha=-1.0), ValueError, "alpha must be a finite number ≥ 0"),
    (lambda: jb.gelu(jnp.ones(3), approximate="tanh"), TypeError, "approximate must be a bool"),
    (lambda: jb.backward(jax.nn.relu), TypeError, "not a jbackprop module"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


NOT_FROM_OUTPUT = (jb.gelu, jb.softplus, jb.elu)
FROM_OUTPUT = [case for case in CASES if case[0] not in NOT_FROM_OUTPUT]


@pytest.mark.parametrize("fn, reference, kw", FROM_OUTPUT,
                         ids=[f"{f.__name__}-{kw}" for f, _, kw in FROM_OUTPUT])
def test_derivative_from_output(fn, reference, kw):
    """Where σ' is a function of σ, ``derivative_from_output(σ)(σ(z), v)`` is autodiff's
    ``(∂σ/∂z)ᵀ v`` of the reference."""
    back = derivative_from_output(functools.partial(fn, **kw) if kw else fn)
    v = jnp.array([[0.3, -1.2, 2.0], [1.5, 0.7, -0.4]])
    expected = jax.vjp(lambda z: reference(z, **kw), Z)[1](v)[0]
    chex.assert_trees_all_close(back(reference(Z, **kw), v), expected, **F64)


@pytest.mark.parametrize("fn, kw", [(f, kw) for f, _, kw in CASES if f in NOT_FROM_OUTPUT],
                         ids=[f"{f.__name__}-{kw}" for f, _, kw in CASES if f in NOT_FROM_OUTPUT])
def test_no_derivative_from_output(fn, kw):
    """GELU, softplus and ELU: σ' is not a function of σ, so there is none."""
    assert derivative_from_output(functools.partial(fn, **kw) if kw else fn) is None

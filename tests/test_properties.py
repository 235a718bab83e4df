"""Property-based tests (hypothesis) over every module: random shapes, batch sizes (1 included),
hyper-parameters and values, in float64. For each example the module's forward equals the
pure-jnp reference, and ``jax.grad`` through the module (its hand-written backward) equals
``jax.grad`` of the reference — with the batch taken by ``jax.vmap`` or, drawn at random, by the
module's leading batch axes.

Reproducible: ``derandomize=True`` (examples are a function of the test's source), no example
database, no deadline (compilation time varies), few examples and small shapes so the file runs
in well under a minute on one core.
"""
import functools

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings

import jbackprop as jb
from jbackprop import reference as ref
from bounds import vjp_at
from helpers import assert_close

PROPERTY = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
batch_sizes = st.integers(1, 3)
sides = st.integers(1, 4)


def values(shape, low=-3.0, high=3.0):
    return hnp.arrays(np.float64, shape, elements=st.floats(low, high, allow_subnormal=False))


@functools.lru_cache(maxsize=None)
def _bound(fn, **kw):
    """One ``functools.partial`` object per (function, hyper-parameters): jit caches hit."""
    return functools.partial(fn, **kw) if kw else fn


@functools.lru_cache(maxsize=None)
def _vmapped(f, in_axes):
    return jax.vmap(f, in_axes)


def check(module, reference, args, in_axes, leading, **kw):
    """Module (vmapped, or on leading batch axes) against the vmapped reference: forward and
    the gradient of ``Σ c ⊙ output`` with respect to every floating argument."""
    args = tuple(jax.tree.map(jnp.asarray, args))
    argnums = tuple(i for i, a in enumerate(args)
                    if all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(a)))
    f = _bound(module, **kw) if leading else _vmapped(_bound(module, **kw), in_axes)
    r = _vmapped(_bound(reference, **kw), in_axes)
    out_r = jax.eval_shape(r, *args)
    c = jnp.asarray(np.random.default_rng(len(out_r.shape)).standard_normal(out_r.shape))
    out, grads = vjp_at(f, argnums, args, c)
    out_ref, grads_ref = vjp_at(r, argnums, args, c)
    assert_close(out, out_ref, 1e-12, "forward")
    assert_close(grads, grads_ref, what="gradient: hand-written vs autodiff of the reference")


# --- element-wise activations ------------------------------------------------------------------
HYPER = {"relu": [{}], "sigmoid": [{}], "tanh": [{}],
         "leaky_relu": [{"gamma": 0.01}, {"gamma": 0.3}, {"gamma": 1.0}],
         "gelu": [{"approximate": False}, {"approximate": True}],
         "softplus": [{"beta": 0.5}, {"beta": 1.0}, {"beta": 7.0}],
         "elu": [{"alpha": 0.0}, {"alpha": 1.0}, {"alpha": 2.5}]}


@pytest.mark.parametrize("name", sorted(HYPER))
@settings(PROPERTY, max_examples=6)
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
       leading=st.booleans())
def test_activations(name, data, shape, leading):
    """z = 0 or 1e-3 ≤ |z| ≤ 3: the references are written plainly (``½(1 + erf)``,
    ``e^z − e^{−z}``, ``e^z − 1``) and lose relative precision beyond 3 and below 1e-3 (tanh's
    numerator is 0 at z = 1e-107); test_extreme_values.py checks |z| up to 1e3 against scipy."""
    kw = data.draw(st.sampled_from(HYPER[name]))
    z = data.draw(hnp.arrays(np.float64, shape, elements=st.one_of(
        st.just(0.0), st.floats(1e-3, 3.0), st.floats(-3.0, -1e-3))))
    check(getattr(jb, name), getattr(ref, name), (z,), 0, leading, **kw)


# --- modules with parameters ---------------------------------------------------------------
@PROPERTY
@given(st.data(), batch_sizes, sides, sides, st.booleans(), st.booleans())
def test_mm(data, B, n, m, bias, leading):
    p = {"W": data.draw(values((n, m)))}
    if bias:
        p["b"] = data.draw(values((n,)))
    check(jb.mm, ref.mm, (p, data.draw(values((B, m)))), (None, 0), leading)


@PROPERTY
@given(st.data(), batch_sizes, st.integers(1, 5), st.sampled_from([1e-5, 0.1]), st.booleans())
def test_layer_norm_s(data, B, m, eps, leading):
    check(jb.layer_norm_s, ref.layer_norm_s, (data.draw(values((B, m))),), 0, leading, eps=eps)


@PROPERTY
@given(st.data(), batch_sizes, st.integers(1, 5), st.sampled_from([(), "m"]),
       st.sampled_from([(), "m"]), st.booleans())
def test_layer_norm(data, B, m, gamma_shape, beta_shape, leading):
    shape = lambda s: (m,) if s == "m" else ()
    p = {"beta": data.draw(values(shape(beta_shape))), "gamma": data.draw(values(shape(gamma_shape)))}
    check(jb.layer_norm, ref.layer_norm, (p, data.draw(values((B, m)))), (None, 0), leading)


@pytest.mark.parametrize("name", ["conv1d_s", "conv1d", "conv2d_s", "conv2d"])
@settings(PROPERTY, max_examples=6)
@given(data=st.data(), B=batch_sizes, k=st.sampled_from([1, 3, 5]), C=st.integers(1, 3),
       C2=st.integers(1, 3), leading=st.booleans())
def test_convolutions(name, data, B, k, C, C2, leading):
    """Odd kernels, which may be larger than the (possibly one-pixel) input."""
    N, single = (2 if name.startswith("conv2d") else 1), name.endswith("_s")
    spatial = tuple(data.draw(st.integers(1, 5)) for _ in range(N))
    w_shape = (k,) * N + (() if single else (C, C2))
    p = {"w": data.draw(values(w_shape)), "b": data.draw(values(() if single else (C2,)))}
    z = data.draw(values((B,) + spatial + (() if single else (C,))))
    check(getattr(jb, name), getattr(ref, name), (p, z), (None, 0), leading)


@PROPERTY
@given(st.data(), batch_sizes, sides, st.sampled_from(["relu", "tanh", "gelu"]), st.booleans())
def test_residual(data, B, m, activation, leading):
    """ReLU's derivative jumps at 0: examples whose pre-activations lie within 1e-9 of the kink
    (where the module's and the reference's round-off may pick different sides) are skipped."""
    p = {f"mm{i}": {"W": data.draw(values((m, m))), "b": data.draw(values((m,)))} for i in (1, 2)}
    z = data.draw(values((B, m)))
    if activation == "relu":
        a1 = z @ p["mm1"]["W"].T + p["mm1"]["b"]
        a2 = np.maximum(a1, 0) @ p["mm2"]["W"].T + p["mm2"]["b"]
        assume(np.all((np.abs(a1) > 1e-9) | (a1 == 0)) and np.all((np.abs(a2) > 1e-9) | (a2 == 0)))
    check(jb.residual, _residual_reference, (p, z), (None, 0), leading,
          activation=getattr(jb, activation))


def _residual_reference(params, z, activation):
    return ref.residual(params, z, getattr(ref, activation.__name__))


# --- losses ----------------------------------------------------------------------------------
@PROPERTY
@given(st.data(), batch_sizes, sides, st.booleans())
def test_mse_loss(data, B, k, leading):
    check(jb.mse_loss, ref.mse_loss, (data.draw(values((B, k))), data.draw(values((B, k)))), 0,
          leading)


@PROPERTY
@given(st.data(), batch_sizes, st.booleans(), st.booleans())
def test_logistic_loss(data, B, soft, leading):
    """Integer labels in {0, 1}, or soft float labels in [0, 1] (differentiated too)."""
    t = data.draw(values((B,), -20.0, 20.0))
    y = data.draw(values((B,), 0.0, 1.0) if soft else hnp.arrays(np.int32, (B,), elements=st.integers(0, 1)))
    check(jb.logistic_loss, ref.logistic_loss, (t, y), 0, leading)


@PROPERTY
@given(st.data(), batch_sizes, st.integers(1, 5), st.booleans())
def test_cross_entropy_loss(data, B, k, leading):
    t = data.draw(values((B, k), -20.0, 20.0))
    y = data.draw(hnp.arrays(np.int32, (B,), elements=st.integers(0, k - 1)))
    check(jb.cross_entropy_loss, ref.cross_entropy_loss, (t, y), 0, leading)

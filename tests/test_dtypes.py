"""Every module in float16, bfloat16, float32 and float64: the output keeps the input dtype,
every cotangent keeps its argument's dtype and is finite, and both are within the documented
rounding-error bound ``K u S`` of a float64 evaluation at the same (rounded) inputs (the bounds
and their derivations: tests/bounds.py, docs/robustness.md)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from bounds import (K_ACTIVATION, activation_scales, assert_within, cross_entropy_scales,
                    layer_norm_scales, logistic_scales, magnitude_scales, mse_scales, to_dtype,
                    unit_roundoff, vjp_at)

DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64]
B = 3                                  # a batch of examples on a leading axis, for every module


def _normal(shape, seed, scale=1.0, shift=0.0):
    return jnp.asarray(shift + scale * np.random.default_rng(seed).standard_normal(shape))


@functools.lru_cache(maxsize=None)
def _batched(reference, in_axes):
    """The per-example reference vmapped over the batch: one object per case, so that the
    jitted float64 reference compiles once and serves all four dtypes."""
    return jax.vmap(reference, in_axes)


def _run(fn, reference, args, argnums, dtype, in_axes):
    """The module in ``dtype``, the batched reference in float64 at the rounded inputs, and
    ``vjp64(args, v)``, the reference's output and cotangents (for the magnitude scales)."""
    a = to_dtype(args, dtype)
    a64 = to_dtype(a, jnp.float64)
    out_shape = jax.eval_shape(fn, *a).shape
    v = _normal(out_shape, 99).astype(dtype)
    out, grads = vjp_at(fn, argnums, tuple(a), v)
    assert out.dtype == dtype, f"output dtype {out.dtype}, input {jnp.dtype(dtype).name}"
    for i, g in zip(argnums, grads):
        for gl, al in zip(jax.tree.leaves(g), jax.tree.leaves(a[i])):
            assert gl.dtype == al.dtype and gl.shape == al.shape, f"cotangent of argument {i}"
            assert bool(jnp.all(jnp.isfinite(gl))), f"cotangent of argument {i} is not finite"
    vjp64 = lambda args, v: vjp_at(_batched(reference, in_axes), argnums, tuple(args), v)
    v64 = v.astype(jnp.float64)
    return a64, v64, (out, grads), vjp64(a64, v64), vjp64


# --- element-wise activations ------------------------------------------------------------------
ACTIVATIONS = {f"{name}-{kw}": (functools.partial(getattr(jb, name), **kw),
                                functools.partial(getattr(ref, name), **kw), name, kw)
               for name, kw in [("relu", {}), ("sigmoid", {}), ("tanh", {}),
                                ("leaky_relu", {"gamma": 0.1}), ("gelu", {}),
                                ("gelu", {"approximate": True}), ("softplus", {}),
                                ("softplus", {"beta": 3.0}), ("elu", {"alpha": 0.7})]}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", list(ACTIVATIONS))
def test_activation_dtypes(case, dtype):
    """σ and σ'(z) ⊙ v within 8 u (|exact| + 1) (tanh-form GELU: plus its multipliers)."""
    fn, r, name, kw = ACTIVATIONS[case]
    z = _normal((B, 6), 1, scale=2.0)
    (z64,), v64, (out, (g,)), (out64, (g64,)), vjp64 = _run(fn, r, (z,), (0,), dtype, 0)
    dout = vjp64((z64,), jnp.ones_like(z64))[1][0]                       # σ'(z) in float64
    s_out, s_grad = activation_scales(name, z64, out64, dout, v64, kw.get("approximate", False))
    u = unit_roundoff(dtype)
    assert_within(out, out64, K_ACTIVATION, u, s_out, f"{case} output")
    assert_within(g, g64, K_ACTIVATION, u, s_grad, f"{case} cotangent")


# --- sums of products -----------------------------------------------------------------------
def _mm_case():
    n, m = 4, 5
    p = {"W": _normal((n, m), 2), "b": _normal((n,), 3)}
    return jb.mm, ref.mm, (p, _normal((B, m), 4)), max(m + 1, n, B) + 2


def _conv_case(name, k=3, C=2, C2=3):
    single = name.endswith("_s")
    N = 2 if name.startswith("conv2d") else 1
    spatial = (5, 6)[:N] if N == 2 else (7,)
    w_shape = (k,) * N + (() if single else (C, C2))
    p = {"w": _normal(w_shape, 5), "b": _normal(() if single else (C2,), 6)}
    z = _normal((B,) + spatial + (() if single else (C,)), 7)
    c_in, c_out = (1, 1) if single else (C, C2)
    K = max(k ** N * c_in + 1, k ** N * c_out, B * int(np.prod(spatial))) + 2
    return getattr(jb, name), getattr(ref, name), (p, z), K


def _gamma(n, u):
    """γ_n = n u / (1 − n u): the relative error bound of a sum of n rounded terms."""
    return n * u / (1 - n * u)


def _pre_activations(p, z):
    """ReLU's inputs in the residual block, and their running-error scales (|·| throughout)."""
    a1 = ref.mm(p["mm1"], z)
    a2 = ref.mm(p["mm2"], ref.relu(a1))
    P = jax.tree.map(jnp.abs, p)
    s1 = ref.mm(P["mm1"], jnp.abs(z))
    return a1, a2, s1, ref.mm(P["mm2"], s1)


def _residual_case(m=4):
    """ReLU blocks on examples whose pre-activations are farther from ReLU's kink than their
    rounding error can reach in bfloat16 (the coarsest dtype), so that no dtype changes which
    branch ReLU takes; ``test_sum_of_products_dtypes`` checks the premise in each dtype."""
    p = {f"mm{i}": {"W": _normal((m, m), 10 + i, 0.5), "b": _normal((m,), 20 + i)} for i in (1, 2)}
    rows = _normal((400, m), 8)
    a1, a2, s1, s2 = (np.asarray(a) for a in jax.vmap(lambda z: _pre_activations(p, z))(rows))
    g = _gamma(m + 1, unit_roundoff(jnp.bfloat16))     # one more γ for rounding the inputs
    ok = np.all((np.abs(a1) > 2 * g * s1) & (np.abs(a2) > 3 * g * s2), 1)
    assert ok.sum() >= B
    return jb.residual, ref.residual, (p, rows[np.flatnonzero(ok)[:B]]), 2 * (m + 1) + B + 2


MULTILINEAR = ["mm", "conv1d_s", "conv1d", "conv2d_s", "conv2d", "residual"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", MULTILINEAR)
def test_sum_of_products_dtypes(name, dtype):
    """Output and every cotangent within K u S, S the reference at |inputs| (its VJP at |v|)."""
    if name == "mm":
        fn, r, args, K = _mm_case()
    elif name == "residual":
        fn, r, args, K = _residual_case()
    else:
        fn, r, args, K = _conv_case(name)
    u = unit_roundoff(dtype)
    a64, v64, (out, grads), (out64, grads64), vjp64 = _run(fn, r, args, (0, 1), dtype, (None, 0))
    s_out, s_grads = magnitude_scales(vjp64, a64, v64)
    if name == "residual":   # the premise: |a| exceeds the bound on its rounding error
        g = _gamma(a64[1].shape[-1] + 1, u)
        a1, a2, s1, s2 = jax.vmap(lambda z: _pre_activations(a64[0], z))(a64[1])
        assert bool(jnp.all(jnp.abs(a1) > g * s1)), "a rounding could flip ReLU(a1)"
        assert bool(jnp.all(jnp.abs(a2) > 2 * g * s2)), "a rounding could flip ReLU(a2)"
    assert_within(out, out64, K, u, s_out, f"{name} output")
    for g, g64, s in zip(jax.tree.leaves(grads), jax.tree.leaves(grads64), jax.tree.leaves(s_grads)):
        assert_within(g, g64, K, u, s, f"{name} cotangent")


# --- layer normalisation -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name, param_shape", [("layer_norm_s", None), ("layer_norm", ()),
                                               ("layer_norm", (6,))])
def test_layer_norm_dtypes(name, param_shape, dtype):
    m, eps = 6, 1e-5
    z = _normal((B, m), 30, scale=1.5, shift=0.7)           # a non-zero mean: c ≈ 1
    u = unit_roundoff(dtype)
    if param_shape is None:
        fn, r, args, argnums, in_axes = jb.layer_norm_s, ref.layer_norm_s, (z,), (0,), 0
    else:
        p = {"beta": _normal(param_shape, 31), "gamma": _normal(param_shape, 32, 0.5, 1.0)}
        fn, r, args, argnums, in_axes = jb.layer_norm, ref.layer_norm, (p, z), (0, 1), (None, 0)
    a64, v64, (out, grads), (out64, grads64), _ = _run(fn, r, args, argnums, dtype, in_axes)
    gamma, beta = (1.0, 0.0) if param_shape is None else (a64[0]["gamma"], a64[0]["beta"])
    s_out, s_z, s_gamma, s_beta = layer_norm_scales(a64[-1], gamma, beta, v64, eps)
    terms = B * (m if param_shape == () else 1)              # the sums to γ's and β's shape
    K = m + 8 + terms
    assert_within(out, out64, K, u, s_out, f"{name} output")
    assert_within(grads[-1], grads64[-1], K, u, s_z, f"{name} z̄")
    if param_shape is not None:
        total = lambda s: s.sum(axis=(0, 1) if param_shape == () else 0)
        assert_within(grads[0]["gamma"], grads64[0]["gamma"], K, u, total(s_gamma), "γ̄")
        assert_within(grads[0]["beta"], grads64[0]["beta"], K, u, total(s_beta), "β̄")


# --- losses ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_cross_entropy_dtypes(dtype):
    k = 5
    t, y = _normal((B, k), 40, scale=3.0), jnp.array([0, 4, 2])
    a64, v64, (out, (g,)), (out64, (g64,)), _ = _run(
        jb.cross_entropy_loss, ref.cross_entropy_loss, (t, y), (0,), dtype, 0)
    s_out, s_t, s_ref = cross_entropy_scales(a64[0], y, v64)
    u = unit_roundoff(dtype)
    assert_within(out, out64, k + 6, u, s_out, "cross-entropy loss", S_ref=s_ref)
    assert_within(g, g64, k + 6, u, s_t, "cross-entropy t̄")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_logistic_dtypes(dtype):
    """Soft labels: both cotangents, (σ(t) − y) v and −t v."""
    t, y = _normal((B, 4), 41, scale=3.0), jnp.asarray(np.random.default_rng(42).uniform(0, 1, (B, 4)))
    a64, v64, (out, (gt, gy)), (out64, (gt64, gy64)), _ = _run(
        jb.logistic_loss, ref.logistic_loss, (t, y), (0, 1), dtype, 0)
    s_out, s_t, s_y, s_t_ref = logistic_scales(*a64, v64)
    u = unit_roundoff(dtype)
    assert_within(out, out64, 6, u, s_out, "logistic loss")
    assert_within(gt, gt64, 6, u, s_t, "logistic t̄", S_ref=s_t_ref)
    assert_within(gy, gy64, 6, u, s_y, "logistic ȳ")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_mse_dtypes(dtype):
    k = 4
    t, y = _normal((B, k), 43), _normal((B, k), 44)
    a64, v64, (out, (gt, gy)), (out64, (gt64, gy64)), _ = _run(
        jb.mse_loss, ref.mse_loss, (t, y), (0, 1), dtype, 0)
    s_out, s_grad = mse_scales(*a64, v64)
    u = unit_roundoff(dtype)
    assert_within(out, out64, k + 5, u, s_out, "squared error")
    assert_within(gt, gt64, 3, u, s_grad, "squared error t̄")
    assert_within(gy, gy64, 3, u, s_grad, "squared error ȳ")

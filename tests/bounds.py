"""Rounding-error bounds for the robustness tests (tests/test_dtypes.py, test_extreme_values.py).

Each module's output and cotangents, computed in a dtype of unit round-off ``u``, are compared
element by element with a float64 evaluation at the same (rounded) inputs:

    |computed − exact| ≤ K · u · S,

where ``S`` is a *running-error scale*: the sum of the magnitudes of the terms the formula adds
(for a sum of products, the same sum of |products|), so that ``S / |exact|`` is the condition
of the formula and ``K`` counts the roundings along the longest chain of operations. Nothing
here is fitted to measured errors; docs/robustness.md derives each scale.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

GELU_C, GELU_A = math.sqrt(2 / math.pi), 0.044715
K_ACTIVATION = 8     # at most four roundings, each ≤ 2 ulps (elementary functions within 2 ulps)


def unit_roundoff(dtype) -> float:
    """u = eps / 2: 2⁻¹¹ (float16), 2⁻⁸ (bfloat16), 2⁻²⁴ (float32), 2⁻⁵³ (float64)."""
    return float(jnp.finfo(dtype).eps) / 2


def assert_within(actual, exact, K, u, S, what="", S_ref=None):
    """``|actual − exact| ≤ K u S`` element-wise (in float64); the worst element on failure.

    ``exact`` is itself a float64 evaluation: where its formula is worse conditioned than the
    module's (``σ(t) − y`` against ``(1 − y)σ(t) − yσ(−t)``), ``K u₆₄ S_ref`` is added for it.
    """
    a, e, S = (np.asarray(x, np.float64) for x in (actual, exact, S))
    assert a.shape == e.shape, f"{what}: shapes {a.shape} vs {e.shape}"
    assert np.all(np.isfinite(a)), f"{what}: non-finite values {a[~np.isfinite(a)][:5]}"
    if S_ref is not None:
        S = S + unit_roundoff(np.float64) / u * np.asarray(S_ref, np.float64)
    err, bound = np.abs(a - e), K * u * np.broadcast_to(S, e.shape)
    if not np.all(err <= bound):
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"{what}: error {err[i]:.3g} > bound {bound[i]:.3g} = {K} u S "
                             f"(u = {u:.3g}, S = {np.broadcast_to(S, e.shape)[i]:.3g}) at {i}: "
                             f"computed {a[i]!r}, float64 {e[i]!r}")


def to_dtype(tree, dtype):
    """The floating leaves of ``tree`` cast to ``dtype`` (integer labels stay as they are)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(jnp.asarray(a).dtype,
                                                                    jnp.floating) else a, tree)


@functools.partial(jax.jit, static_argnums=(0, 1))
def vjp_at(f, argnums, args, v):
    """``f(*args)`` and the cotangents of ``args[i]`` for ``i`` in ``argnums`` for ``v``."""
    def g(*diff):
        full = list(args)
        for i, d in zip(argnums, diff):
            full[i] = d
        return f(*full)
    out, pullback = jax.vjp(g, *[args[i] for i in argnums])
    return out, pullback(v)


# --- element-wise activations ----------------------------------------------------------------
def activation_scales(name, z, out, dout, v, approximate=False):
    """``(S_out, S_grad)``: ``|σ(z)| + 1`` and ``(|σ'(z)| + 1)|v|``.

    The ``+ 1`` is the absolute error that ``1 − y²``, ``y(1 − y)``, ``1 + tanh`` or ``1 + erf``
    make from a ``y`` of size at most 1. For the tanh form of GELU the rounding of ``1 + t`` and
    ``1 − t²`` is multiplied by ``|z|/2`` and ``|z| c (1 + 3a z²)/2`` wherever tanh has not yet
    saturated (|z| < 10 in every dtype); those multipliers are added.
    """
    z, out, dout, v = (np.asarray(a, np.float64) for a in (z, out, dout, v))
    s_out, s_grad = np.abs(out) + 1, np.abs(dout) + 1
    if name == "gelu" and approximate:
        live = np.abs(z) < 10
        s_out = s_out + np.where(live, np.abs(z) / 2, 0)
        s_grad = s_grad + np.where(live, np.abs(z) * GELU_C * (1 + 3 * GELU_A * z * z) / 2, 0)
    return s_out, s_grad * np.abs(v)


# --- sums of products: MM, the convolutions, the residual block away from ReLU's kink --------
def magnitude_scales(vjp, args, v):
    """``S`` of a multilinear map: the map at ``|args|``, and its VJP there applied to ``|v|``.

    For ``u = Σ_j w_j z_j + b`` the error of any summation order is at most ``γ_K Σ|w_j z_j|``
    (K terms), and ``Σ|w_j||z_j| + |b|`` is exactly the map evaluated at the magnitudes; the
    same holds for every cotangent (``Σ_i |W_ij||v_i|``, ``|v_i||z_j|``, ...). For ReLU layers on
    inputs away from the kink the masks are exact and ReLU is the identity on magnitudes.
    ``vjp(args, v)`` returns ``(output, cotangents)`` of the float64 reference.
    """
    return vjp(jax.tree.map(jnp.abs, args), jnp.abs(v))


# --- layer normalisation ---------------------------------------------------------------------
def layer_norm_scales(z, gamma, beta, v, eps):
    """``(S_out, S_z̄, S_γ̄ per element, S_β̄ per element)`` for LN over the last axis.

    ``c = mean|z| / σ̂`` is the condition of centring (the mean's error ``γ_m mean|z|``
    relative to ``σ̂``), and ``X = |x̂| + c (1 + |x̂|)`` bounds the error of ``x̂`` in units of
    ``K u``. Then ``LN = β + γ x̂`` has scale ``|β| + |γ| X``; ``z̄ = (1/σ̂)(g − mean g −
    x̂ mean(g x̂))`` with ``g = γ v`` has ``(1/σ̂)(|g| + mean|g| + X mean(|g| X)) + c |z̄|``;
    ``γ̄`` sums ``|v| X`` and ``β̄`` sums ``|v|`` (the sums to the parameter shapes are left to
    the caller, which knows them).
    """
    z, gamma, beta, v = (np.asarray(a, np.float64) for a in (z, gamma, beta, v))
    mu = z.mean(-1, keepdims=True)
    r = 1 / np.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (z - mu) * r
    c = np.abs(z).mean(-1, keepdims=True) * r
    X = np.abs(xhat) + c * (1 + np.abs(xhat))
    g = np.abs(gamma * v)
    zbar = r * (gamma * v - (gamma * v).mean(-1, keepdims=True)
                - xhat * (gamma * v * xhat).mean(-1, keepdims=True))
    s_out = np.abs(beta) + np.abs(gamma) * X
    s_z = r * (g + g.mean(-1, keepdims=True) + X * (g * X).mean(-1, keepdims=True)) + c * np.abs(zbar)
    return s_out, s_z, np.abs(v) * X, np.abs(v)


# --- losses ----------------------------------------------------------------------------------
def cross_entropy_scales(t, y, v):
    """``S_out = |lse| + |s_y| + 1`` and ``S_t̄ = (p (1 + |s| + lse) + |p − e_y|) |v|``, with
    ``s = t − max t`` and ``lse = log Σ e^s``: the loss ``lse − s_y`` and ``p = e^{s − lse}``
    (whose argument carries the errors of ``s`` and ``lse``). Also ``S_ref = |max t| + |t_y| +
    lse + 1`` of the float64 reference ``max t + log Σ e^{t − max t} − t_y``, which adds and
    subtracts ``max t`` (1e4 at the extreme logits)."""
    t, v = np.asarray(t, np.float64), np.asarray(v, np.float64)
    y = np.asarray(y)[..., None]
    s = t - t.max(-1, keepdims=True)
    lse = np.log(np.exp(s).sum(-1, keepdims=True))
    p = np.exp(s - lse)
    e_y = np.arange(t.shape[-1]) == y
    s_y = np.take_along_axis(s, y, -1)
    s_ref = np.abs(t).max(-1, keepdims=True) + np.abs(np.take_along_axis(t, y, -1)) + lse + 1
    return ((np.abs(lse) + np.abs(s_y) + 1)[..., 0],
            (p * (1 + np.abs(s) + lse) + np.abs(p - e_y)) * np.abs(v)[..., None], s_ref[..., 0])


def logistic_scales(t, y, v):
    """``max(t, 0) − y t + log1p(e^{−|t|})`` and ``(1 − y) σ(t) − y σ(−t)``, term by term; and
    ``S_ref = (σ(t) + |y|)|v|`` of the float64 reference's ``σ(t) − y``, which cancels."""
    from scipy.special import expit
    t, y, v = (np.asarray(a, np.float64) for a in (t, y, v))
    s_out = np.maximum(t, 0) + np.abs(y * t) + np.log1p(np.exp(-np.abs(t)))
    s_t = (np.abs(1 - y) * expit(t) + np.abs(y) * expit(-t)) * np.abs(v)
    return s_out, s_t, np.abs(t * v), (expit(t) + np.abs(y)) * np.abs(v)


def mse_scales(t, y, v):
    """``½ Σ (t − y)²`` is a sum of non-negative terms: ``S_out`` is the loss itself; the
    cotangents ``±(t − y) v`` have ``|t − y| |v|``."""
    d = np.asarray(t, np.float64) - np.asarray(y, np.float64)
    v = np.asarray(v, np.float64)
    return 0.5 * (d * d).sum(-1), np.abs(d) * np.abs(v)[..., None]

"""Layer normalisation LN-S and LN (notes 7.40–7.47), RMSNorm and batch normalisation;
derivations in docs/normalisation.md.

Over the last axis of ``z ∈ R^m`` (any leading axes are independent rows):

    μ̂ = mean(z),  σ̂ = sqrt(mean((z − μ̂)²) + ε)  (divide by m),  x̂ = (z − μ̂)/σ̂,
    LN-S(z) = x̂,  LN(z) = β + γ x̂.

With ``g = γ ⊙ v`` (``g = v`` for LN-S) the hand-written backward is

    B[LN, z](v) = (1/σ̂)(g − mean(g) − x̂ · mean(g ⊙ x̂)),
    B[LN, γ](v) = Σ v ⊙ x̂,   B[LN, β](v) = Σ v   (summed to the shapes of γ and β).

Residuals: ``x̂`` (the shape of ``z``) and ``1/σ̂`` (one number per row) only — plus a reference
to the parameter ``γ``, which is an input and allocates nothing. ``z``, ``μ̂`` and ``z − μ̂`` are
not kept. The statistics are computed in at least float32 (two-pass: the mean first, then the
mean of squared deviations), so bfloat16/float16 inputs do not lose the variance; outputs and
cotangents have the dtypes of the inputs.

Batch normalisation is the same calculus with the means taken over the batch (every axis but
the features, and across ``jax.vmap``'s ``axis_name`` by ``lax.pmean``) instead of the row.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jbackprop import reference
from jbackprop.modules import arguments
from jbackprop.modules.registry import declare, normal
from jbackprop.modules.rules import custom_rules
from jbackprop.modules.wiring import apply

# The public modules, re-exported by jbackprop.
__all__ = ["layer_norm_s", "layer_norm", "rms_norm", "batch_norm"]

_row_mean = functools.partial(jnp.mean, axis=-1, keepdims=True)   # LN's mean: over the row


def _standardise(z, eps, mean=_row_mean):
    """``x̂`` in ``z``'s dtype, and ``1/σ̂`` in at least float32 (``mean`` keeps its axes)."""
    zc = z.astype(jnp.promote_types(z.dtype, jnp.float32))
    d = zc - mean(zc)                                 # z − μ̂ (two-pass)
    r = jax.lax.rsqrt(mean(d * d) + eps)              # 1/σ̂
    return (d * r).astype(z.dtype), r


def _z_bar(g, xhat, r, mean=_row_mean):
    """B[LN-S, z](g) = (1/σ̂)(g − mean(g) − x̂ · mean(g ⊙ x̂)), row by row; in ``x̂``'s dtype.

    LN-S's Jacobian ``(1/σ̂)(I − 𝟙𝟙ᵀ/m − x̂x̂ᵀ/m)`` is symmetric, so this is its JVP ``J ż``
    too (with ``g = ż``). With ``mean`` over the batch it is batch norm's (BN-S's)."""
    g, x = g.astype(r.dtype), xhat.astype(r.dtype)
    return (r * (g - mean(g) - x * mean(g * x))).astype(xhat.dtype)


def _z_bar_per_feature(v, gamma, xhat, r):
    """B[LN, z](v) for a per-feature ``γ`` of shape (m,), when ``x̂`` is float32 or wider.

    The row means of ``g = γ ⊙ v`` and ``g ⊙ x̂`` are matrix–vector products, ``(v γ)/m`` and
    ``((v ⊙ x̂) γ)/m``, so ``g`` is never formed as an array: on the layer-norm benchmark this
    saves a third of the backward's temporary memory and about a tenth of its time.
    """
    m = xhat.shape[-1]
    mean_g = (v @ gamma)[..., None] / m                         # mean(γ ⊙ v), row by row
    mean_gx = ((v * xhat) @ gamma)[..., None] / m               # mean(γ ⊙ v ⊙ x̂)
    return (r * (gamma * v - mean_g - xhat * mean_gx)).astype(xhat.dtype)


def _sum_to(a, ndim):
    """Σ over the leading axes of ``a`` down to its last ``ndim`` axes (0: a scalar, 1: (m,))."""
    return a.sum(axis=tuple(range(a.ndim - ndim)))


# --- LN-S(z) = x̂ ---------------------------------------------------------------------------
@functools.partial(custom_rules, nondiff_argnames=("eps",), batch_argnums=(0,))
def _layer_norm_s(z, eps):
    return _standardise(z, eps)[0]


def _layer_norm_s_fwd(z, eps):
    xhat = _layer_norm_s(z, eps)
    r = _standardise(z, eps)[1]                       # same ops as in the core: XLA CSEs them
    return xhat, (xhat, r)                            # residuals: x̂ (the output) and 1/σ̂


def _layer_norm_s_bwd(eps, res, v):
    xhat, r = res
    return (_z_bar(v, xhat, r),)


def _layer_norm_s_jvp(eps, res, z_dot):
    xhat, r = res
    return _z_bar(z_dot, xhat, r)                     # (1/σ̂)(ż − mean ż − x̂ mean(ż ⊙ x̂))


_layer_norm_s.defrules(_layer_norm_s_fwd, _layer_norm_s_bwd, _layer_norm_s_jvp)


# --- LN(z) = β + γ x̂ -----------------------------------------------------------------------
@functools.partial(custom_rules, nondiff_argnames=("eps",), batch_argnums=(1,))
def _layer_norm(params, z, eps):
    return params["beta"] + params["gamma"] * _standardise(z, eps)[0]


def _layer_norm_fwd(params, z, eps):
    xhat, r = _standardise(z, eps)                   # same ops as in the core: XLA CSEs them
    beta_axes = (None,) * params["beta"].ndim        # β's rank as structure: no array kept
    return _layer_norm(params, z, eps), (xhat, r, params["gamma"], beta_axes)  # x̂, 1/σ̂ (γ)


def _layer_norm_bwd(eps, res, v):
    xhat, r, gamma, beta_axes = res
    gamma_bar = _sum_to(v * xhat, gamma.ndim)        # B[LN, γ](v) = Σ v ⊙ x̂ (Σ_batch too)
    beta_bar = _sum_to(v, len(beta_axes))            # B[LN, β](v) = Σ v
    if gamma.ndim == 1 and xhat.dtype == r.dtype:    # B[LN, z](v) with g = γ ⊙ v
        z_bar = _z_bar_per_feature(v, gamma, xhat, r)
    else:                                             # scalar γ, or x̂ below float32
        z_bar = _z_bar(gamma * v, xhat, r)
    # β and γ share a dtype (the check casts them), so γ's dtype is β's too.
    return {"beta": beta_bar.astype(gamma.dtype), "gamma": gamma_bar.astype(gamma.dtype)}, z_bar


def _layer_norm_jvp(eps, res, params_dot, z_dot):
    xhat, r, gamma, _ = res                           # β̇ + γ̇ ⊙ x̂ + γ ⊙ J_LN-S ż
    return params_dot["beta"] + params_dot["gamma"] * xhat + gamma * _z_bar(z_dot, xhat, r)


_layer_norm.defrules(_layer_norm_fwd, _layer_norm_bwd, _layer_norm_jvp)


# --- public modules --------------------------------------------------------------------------
def _z_and_eps(z, eps, name):
    z = arguments.float_array(z, "z", min_ndim=1)
    if z.shape[-1] == 0:
        raise ValueError(f"{name}: z's last axis (the features) must not be empty, "
                         f"got shape {z.shape}")
    return z, arguments.static_number(eps, "eps", low=0)


def layer_norm_s(z, eps=1e-5):
    r"""LN-S (7.40): ``(z − μ̂)/σ̂`` over the last axis, ``σ̂ = sqrt(mean((z − μ̂)²) + ε)``.

    .. math::
        B[\mathrm{LN\text{-}S}, z](v) = \tfrac{1}{\hat\sigma}\big(v - \mathrm{mean}(v)
            - \hat x\,\mathrm{mean}(v \odot \hat x)\big).

    Residuals: the output ``x̂`` and ``1/σ̂`` (one number per row).

    Args:
      z: ``(m,)``, or ``(..., m)``: leading axes are independent rows.
      eps: static ``ε ≥ 0`` added to the variance. With ``eps=0`` a constant row divides by
        zero (the output is NaN); with ``eps > 0`` it is finite (zero) with finite gradients.

    Raises:
      TypeError / ValueError: ``z`` is not a floating array of rank ≥ 1, or ``eps`` is not a
        number ``≥ 0``.
    """
    z, eps = _z_and_eps(z, eps, "layer_norm_s")
    return apply(_layer_norm_s, z, eps=eps)


def _rows(rng):
    """Rows at two shapes, with a non-zero mean (which LN removes)."""
    return [normal(rng, 7, 5) + 0.5, normal(rng, 3, 4, 16) - 0.3]


declare(layer_norm_s, core=_layer_norm_s, reference=reference.layer_norm_s,
        examples=lambda rng: [(z,) for z in _rows(rng)], family="normalisation",
        section="ln-s", shapes="over the last axis, any leading axes",
        backward="`(1/σ̂)(v − mean v − x̂ mean(v⊙x̂))`",
        tangent="`(1/σ̂)(ż − mean ż − x̂ mean(ż⊙x̂))`", layer="LayerNormS")


def layer_norm(params, z, eps=1e-5):
    r"""Layer normalisation LN (7.41): ``β + γ · LN-S(z)`` over the last axis.

    .. math::
        B[\mathrm{LN}, z](v) = \tfrac{1}{\hat\sigma}\big(g - \mathrm{mean}(g)
            - \hat x\,\mathrm{mean}(g \odot \hat x)\big),\ g = \gamma \odot v; \quad
        B[\mathrm{LN}, \gamma](v) = \textstyle\sum v \odot \hat x; \quad
        B[\mathrm{LN}, \beta](v) = \textstyle\sum v.

    The sums run over the leading (batch) axes, and over the features when γ or β is a
    scalar. Residuals: ``x̂`` and ``1/σ̂`` (and a reference to the parameter ``γ``). Under
    ``jax.vmap`` the module is called once on the batch.

    Args:
      params: ``{"beta": ..., "gamma": ...}``, each of shape ``()`` (a scalar, as in the
        notes) or ``(m,)`` (one per feature); they may differ.
      z: ``(m,)``, or ``(..., m)`` with leading batch axes.
      eps: static ``ε ≥ 0`` added to the variance (see ``layer_norm_s``).

    Returns:
      The shape of ``z``, in the dtype of ``z`` promoted with the parameters'.

    Raises:
      TypeError / ValueError: wrong keys, shapes or dtypes of ``params``, ``z`` of rank 0 or
        not floating, ``eps`` not a number ``≥ 0``.
    """
    params, z, eps = _layer_norm_arguments(params, z, eps)
    return apply(_layer_norm, params, z, eps=eps)


def _layer_norm_arguments(params, z, eps):
    """Check ``layer_norm``'s arguments (trace time) and cast them to their common dtype."""
    p = arguments.params_dict(params, "params", ("beta", "gamma"))
    z, eps = _z_and_eps(z, eps, "layer_norm")
    m = z.shape[-1]
    for k in ("beta", "gamma"):
        if p[k].shape not in ((), (m,)):
            raise ValueError(f"layer_norm: params[{k!r}] must have shape () (a scalar, as in "
                             f"the notes) or ({m},) (one per feature of z, shape {z.shape}), "
                             f"got {p[k].shape}")
    return (*arguments.promote(p, z), eps)


def _per_feature_init(key, in_shape, dtype):
    """β = 0, γ = 1, one of each per feature."""
    return {"beta": jnp.zeros(in_shape[-1:], dtype), "gamma": jnp.ones(in_shape[-1:], dtype)}


declare(layer_norm, core=_layer_norm, num_arrays=2, reference=reference.layer_norm,
        examples=lambda rng: [({"beta": normal(rng, 5), "gamma": normal(rng, 5)}, z)
                              if z.shape[-1] == 5 else ({"beta": normal(rng), "gamma": normal(rng)}, z)
                              for z in _rows(rng)],
        family="normalisation", section="ln",
        shapes="`{\"beta\": () or (m,), \"gamma\": () or (m,)}`, `z (..., m)`",
        backward="as LN-S with `γ⊙v`; `Σ v⊙x̂`, `Σ v`", tangent="`β̇ + γ̇ x̂ + γ ⊙ J_LN-S ż`",
        layer="LayerNorm", init=_per_feature_init)


# --- RMSNorm(z) = γ ⊙ z / sqrt(mean(z²) + ε) ---------------------------------------------------
def _root_mean_square(z, eps):
    """``x̂ = z r`` in ``z``'s dtype, and ``r = 1/sqrt(mean(z²) + ε)`` (keepdims) in at least
    float32 (one number per row)."""
    zc = z.astype(jnp.promote_types(z.dtype, jnp.float32))
    r = jax.lax.rsqrt(jnp.mean(zc * zc, axis=-1, keepdims=True) + eps)
    return (zc * r).astype(z.dtype), r


@functools.partial(custom_rules, nondiff_argnames=("eps",), batch_argnums=(1,))
def _rms_norm(params, z, eps):
    return params["gamma"] * _root_mean_square(z, eps)[0]


def _rms_norm_fwd(params, z, eps):
    xhat, r = _root_mean_square(z, eps)              # same ops as in the core: XLA CSEs them
    return _rms_norm(params, z, eps), (xhat, r, params["gamma"])  # residuals: x̂, r (and γ)


def _rms_norm_bwd(eps, res, v):
    xhat, r, gamma = res
    gamma_bar = _sum_to(v * xhat, gamma.ndim)                  # B[RMS, γ](v) = Σ v ⊙ x̂
    g, x = (gamma * v).astype(r.dtype), xhat.astype(r.dtype)   # g = γ ⊙ v, in ≥ float32
    z_bar = r * (g - x * jnp.mean(g * x, axis=-1, keepdims=True))  # r (g − x̂ mean(g ⊙ x̂))
    return {"gamma": gamma_bar.astype(gamma.dtype)}, z_bar.astype(xhat.dtype)


def _rms_norm_jvp(eps, res, params_dot, z_dot):
    xhat, r, gamma = res
    zd, x = z_dot.astype(r.dtype), xhat.astype(r.dtype)       # in ≥ float32
    xhat_dot = r * (zd - x * jnp.mean(zd * x, axis=-1, keepdims=True))  # r (ż − x̂ mean(ż ⊙ x̂))
    return params_dot["gamma"] * xhat + gamma * xhat_dot.astype(xhat.dtype)   # γ̇ x̂ + γ x̂̇


_rms_norm.defrules(_rms_norm_fwd, _rms_norm_bwd, _rms_norm_jvp)


def rms_norm(params, z, eps=1e-6):
    r"""RMSNorm: ``γ ⊙ z / sqrt(mean(z²) + ε)`` over the last axis (no centring, no β).

    With ``r = 1/sqrt(mean(z²) + ε)``, ``x̂ = r z`` and ``g = γ ⊙ v``:

    .. math::
        B[\mathrm{RMS}, z](v) = r\,\big(g - \hat x\,\mathrm{mean}(g \odot \hat x)\big), \quad
        B[\mathrm{RMS}, \gamma](v) = \textstyle\sum v \odot \hat x.

    The sum runs over the leading (batch) axes, and over the features when γ is a scalar.
    Residuals: ``x̂`` and ``r`` (one number per row), and a reference to ``γ``.

    Args:
      params: ``{"gamma": ()}`` (a scalar) or ``{"gamma": (m,)}`` (one per feature).
      z: ``(m,)``, or ``(..., m)`` with leading batch axes.
      eps: static ``ε ≥ 0`` added to the mean square. With ``eps=0`` a zero row divides by
        zero (NaN); with ``eps > 0`` it is finite (zero) with finite gradients.

    Returns:
      The shape of ``z``, in the promoted dtype of ``params`` and ``z``.

    Raises:
      TypeError / ValueError: wrong keys or shape of ``params``, ``z`` of rank 0, empty or not
        floating, ``eps`` not a finite number ``≥ 0``.
    """
    p = arguments.params_dict(params, "params", ("gamma",))
    z, eps = _z_and_eps(z, eps, "rms_norm")
    if p["gamma"].shape not in ((), z.shape[-1:]):
        raise ValueError(f"rms_norm: params['gamma'] must have shape () or ({z.shape[-1]},) (one "
                         f"per feature of z, shape {z.shape}), got {p['gamma'].shape}")
    params, z = arguments.promote(p, z)
    return apply(_rms_norm, params, z, eps=eps)


declare(rms_norm, core=_rms_norm, num_arrays=2, reference=reference.rms_norm,
        examples=lambda rng: [({"gamma": normal(rng, *z.shape[-1:] if z.shape[-1] == 5 else ())}, z)
                              for z in _rows(rng)],
        family="normalisation", section="rmsnorm",
        shapes="`{\"gamma\": () or (m,)}`, `z (..., m)`",
        backward="`r (g − x̂ mean(g⊙x̂))`, `g = γ⊙v`; `Σ v⊙x̂`",
        tangent="`γ̇ x̂ + γ r (ż − x̂ mean(ż⊙x̂))`", layer="RMSNorm",
        init=lambda key, in_shape, dtype: {"gamma": jnp.ones(in_shape[-1:], dtype)})


# --- BN(z) = β + γ x̂, with the statistics of the batch -------------------------------------------
def _over_batch(axis_name):
    """Batch norm's mean: over every axis of ``a`` but the last (the features) and, when
    ``axis_name`` is set, across that ``jax.vmap`` axis too (``lax.pmean``)."""
    def mean(a):
        local = jnp.mean(a, axis=tuple(range(a.ndim - 1)))
        return local if axis_name is None else jax.lax.pmean(local, axis_name)
    return mean


@functools.partial(custom_rules, nondiff_argnames=("eps", "axis_name"))
def _batch_norm(params, z, eps, axis_name):
    return params["beta"] + params["gamma"] * _standardise(z, eps, _over_batch(axis_name))[0]


def _batch_norm_fwd(params, z, eps, axis_name):
    xhat, r = _standardise(z, eps, _over_batch(axis_name))   # XLA CSEs them with the core's
    return _batch_norm(params, z, eps, axis_name), (xhat, r, params["gamma"])  # x̂, 1/σ̂ (γ)


def _batch_norm_bwd(eps, axis_name, res, v):
    xhat, r, gamma = res
    lead = tuple(range(v.ndim - 1))                   # this call's examples; under jax.vmap the
    gamma_bar = jnp.sum(v * xhat, axis=lead)          # sums over the mapped axis are JAX's
    beta_bar = jnp.sum(v, axis=lead)                  # (the transpose of γ's, β's broadcast)
    z_bar = _z_bar(gamma * v, xhat, r, _over_batch(axis_name))    # pmean(v), pmean(v ⊙ x̂) inside
    return {"beta": beta_bar.astype(gamma.dtype), "gamma": gamma_bar.astype(gamma.dtype)}, z_bar


def _batch_norm_jvp(eps, axis_name, res, params_dot, z_dot):
    xhat, r, gamma = res                              # β̇ + γ̇ ⊙ x̂ + γ ⊙ J_BN-S ż
    z_term = _z_bar(z_dot, xhat, r, _over_batch(axis_name))
    return params_dot["beta"] + params_dot["gamma"] * xhat + gamma * z_term


_batch_norm.defrules(_batch_norm_fwd, _batch_norm_bwd, _batch_norm_jvp)


def batch_norm(params, z, eps=1e-5, axis_name=None):
    r"""Batch normalisation (training mode): ``β + γ ⊙ x̂``, ``x̂`` standardised over the batch.

    Feature by feature, with ``mean`` over the batch (every axis of ``z`` but the last, and
    across the ``jax.vmap`` axis ``axis_name`` when given), ``σ̂ = sqrt(mean((z − μ̂)²) + ε)``:

    .. math::
        B[\mathrm{BN}, z](v) = \tfrac{1}{\hat\sigma}\big(g - \mathrm{mean}(g)
            - \hat x\,\mathrm{mean}(g \odot \hat x)\big),\ g = \gamma \odot v; \quad
        B[\mathrm{BN}, \gamma](v) = \textstyle\sum v \odot \hat x; \quad
        B[\mathrm{BN}, \beta](v) = \textstyle\sum v.

    Both rules hold ``lax.pmean`` over ``axis_name``: every example's ``z̄`` sees the whole
    batch's ``v``. Residuals: ``x̂``, ``1/σ̂`` (one per feature) and a reference to ``γ``.
    There are no running statistics: evaluation batches are normalised with their own
    statistics (``docs/normalisation.md`` shows how to fold fixed ones into γ and β).

    Args:
      params: ``{"beta": (m,), "gamma": (m,)}``.
      z: a batch ``(N, ..., m)`` (statistics over all axes but the last) when ``axis_name`` is
        ``None``; under ``jax.vmap(..., axis_name=name)`` with ``axis_name=name``, one example
        ``(..., m)``, its statistics taken across the mapped axis (and its own leading axes).
      eps: static ``ε ≥ 0`` added to the variance.
      axis_name: ``None``, or the name of an enclosing ``jax.vmap`` axis.

    Returns:
      The shape of ``z``, in the promoted dtype of ``params`` and ``z``.

    Raises:
      TypeError / ValueError: wrong keys or shapes of ``params``; ``z`` not floating, of rank 0,
        or without a batch axis when ``axis_name`` is ``None``; ``axis_name`` not bound by an
        enclosing ``jax.vmap``; ``eps`` not a number ``≥ 0``.
    """
    p = arguments.params_dict(params, "params", ("beta", "gamma"))
    z, eps = _z_and_eps(z, eps, "batch_norm")
    _batch_axes(z, axis_name)
    for k in ("beta", "gamma"):
        if p[k].shape != z.shape[-1:]:
            raise ValueError(f"batch_norm: params[{k!r}] must have shape ({z.shape[-1]},) (one "
                             f"per feature of z, shape {z.shape}), got {p[k].shape}")
    params, z = arguments.promote(p, z)
    return apply(_batch_norm, params, z, eps=eps, axis_name=axis_name)


def _batch_axes(z, axis_name):
    """There is a batch to take statistics over: ``z``'s leading axes or a named vmap axis."""
    if axis_name is None:
        if z.ndim < 2 or 0 in z.shape[:-1]:
            raise ValueError(f"batch_norm: z of shape {z.shape} has no batch to take statistics "
                             "over: pass a batch z of shape (N, ..., m), N ≥ 1, or call it per "
                             "example under jax.vmap(..., axis_name=name) with axis_name=name")
        return
    try:
        jax.lax.axis_size(axis_name)
    except NameError:
        raise ValueError(f"batch_norm: axis_name={axis_name!r} is not the name of an enclosing "
                         f"jax.vmap axis: call it under jax.vmap(..., axis_name={axis_name!r}), "
                         "or pass axis_name=None with a batch z") from None


declare(batch_norm, core=_batch_norm, num_arrays=2, reference=reference.batch_norm,
        examples=lambda rng: [({"beta": normal(rng, 5), "gamma": normal(rng, 5)},
                               normal(rng, 8, 5, scale=2.0) + 0.7),
                              ({"beta": normal(rng, 6), "gamma": normal(rng, 6)},
                               normal(rng, 4, 3, 6) - 0.4)],
        family="normalisation", section="batchnorm", batch_axes=False,
        shapes="`{\"beta\": (m,), \"gamma\": (m,)}`, `z (N, ..., m)` or per example with "
               "`axis_name`",
        backward="as LN with means over the batch (`pmean`)", tangent="`β̇ + γ̇ x̂ + γ ⊙ J_BN-S ż`",
        layer="BatchNorm",
        init=_per_feature_init)

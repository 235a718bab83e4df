"""The fused MM + cross-entropy loss; derivation in docs/losses.md (§ fused linear + cross-entropy).

``linear_cross_entropy(params, z, y) = cross_entropy_loss(mm(params, z), y)`` row by row, for a
large number of classes (a vocabulary): the forward, the hand-written backward and the
hand-written JVP each recompute the logits ``chunk_size`` rows at a time
(``blocks.by_row_blocks``), so that no direction holds the (rows × classes) logits. It is a
loss of the ``losses`` family (declared there in the registry and the documentation).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from jbackprop import reference
from jbackprop.modules import arguments
from jbackprop.modules.blocks import by_row_blocks
from jbackprop.modules.losses import _compute_dtype, _valid
from jbackprop.modules.registry import declare, normal
from jbackprop.modules.rules import custom_rules
from jbackprop.modules.wiring import apply

# The public module, re-exported by jbackprop.
__all__ = ["linear_cross_entropy"]


# --- fused MM + cross-entropy: ℓ_i = logsumexp(s_i) − s_{i,y_i}, s_i = W z_i + b ------------------
# Every rule recomputes the logits of one block of rows at a time (``by_row_blocks``): the
# residuals are the inputs and one log-sum-exp per row, never the (rows × classes) logits.
def _logits(z, params):
    """``s = z Wᵀ + b`` for a block of rows ``z (c, m)``, in at least float32."""
    s = jnp.dot(z, params["W"].T, preferred_element_type=_compute_dtype(z.dtype))
    return s + params["b"] if "b" in params else s


def _rows_of(z, y):
    """``z (..., m)`` and ``y (...)`` as rows ``(N, m)`` and ``(N, 1)``."""
    return z.reshape(-1, z.shape[-1]), y.reshape(-1, 1)


def _lce_block(z, y, rows, params):
    """One block: ``(ℓ, lse)``, each ``(c, 1)``; NaN for a label outside ``0..k−1``."""
    s = _logits(z, params)
    k = s.shape[-1]
    top = jnp.max(s, axis=-1, keepdims=True)
    lse = top + jnp.log(jnp.sum(jnp.exp(s - top), axis=-1, keepdims=True))
    s_y = jnp.take_along_axis(s, jnp.clip(y, 0, k - 1), axis=-1)
    return jnp.where(_valid(y, k), lse - s_y, jnp.nan), lse


def _probabilities(z, y, lse, params):
    """``(p, e_y, k)`` of a block: ``p = exp(s − lse)`` (the softmax, recomputed from ``lse``)
    and the one-hot labels."""
    s = _logits(z, params)
    k = s.shape[-1]
    return jnp.exp(s - lse), jnp.arange(k) == y, k


# Two cores, as for attention. `_lce_with_lse` returns (ℓ, lse), both differentiable, with the
# rules below; `_linear_cross_entropy` (the module) returns ℓ, and its forward rule calls
# `_lce_with_lse`, so that under second order (jax.hessian) the tangent of the residual lse is
# hand-written too.
@functools.partial(custom_rules, nondiff_argnames=("chunk_size",), batch_argnums=(1, 2))
def _lce_with_lse(params, z, y, chunk_size):
    return _lce_with_lse_fwd(params, z, y, chunk_size)[0]


def _lce_with_lse_fwd(params, z, y, chunk_size):
    Z, Y = _rows_of(z, y)
    loss, lse = by_row_blocks(_lce_block, chunk_size, Z.shape[0], (Z, Y), (params,))
    lse = lse.reshape(y.shape)                           # one per row, in at least float32
    return (loss.reshape(y.shape).astype(z.dtype), lse), (params, z, y, lse)  # residual: lse


def _lce_with_lse_bwd(chunk_size, res, bars):
    """Per block, for ``ℓ̄ = v`` and ``lse̅ = w``: ``g = v (p − e_y) + w p``; ``z̄ = g W``,
    ``W̄ = Σ gᵀ z``, ``b̄ = Σ g`` (summed over the blocks in the scan)."""
    params, z, y, lse = res
    v, w = bars
    Z, Y = _rows_of(z, y)

    def block(z, y, lse, v, w, rows, params):
        p, e_y, k = _probabilities(z, y, lse, params)
        g = jnp.where(_valid(y, k), v * (p - e_y) + w * p, jnp.nan)   # (c, k), row by row
        bars = {"W": g.T @ z.astype(g.dtype)}                         # Σ_rows g zᵀ
        if "b" in params:
            bars["b"] = g.sum(0)                                      # Σ_rows g
        return g @ params["W"].astype(g.dtype), bars                  # z̄ = Wᵀ g, row by row

    rows = lambda a: jnp.zeros_like(lse).reshape(-1, 1) if a is None else \
        a.reshape(-1, 1).astype(lse.dtype)
    z_bar, p_bar = by_row_blocks(block, chunk_size, Z.shape[0],
                                 (Z, Y, rows(lse), rows(v), rows(w)), (params,), sum_outputs=1)
    p_bar = {key: p_bar[key].astype(params[key].dtype) for key in params}
    return p_bar, z_bar.reshape(z.shape).astype(z.dtype), None   # None: the integer labels


def _lce_with_lse_jvp(chunk_size, res, params_dot, z_dot, y_dot):
    """Per row, with ``ṡ = W ż + Ẇ z + ḃ``: ``lsė = ⟨p, ṡ⟩`` and ``ℓ̇ = lsė − ṡ_y`` (by blocks)."""
    params, z, y, lse = res
    Z, Y = _rows_of(z, y)

    def block(z, y, lse, z_dot, rows, params, params_dot):
        p, e_y, k = _probabilities(z, y, lse, params)
        s_dot = _logits(z_dot, {"W": params["W"]}) + _logits(z, params_dot)   # W ż + (Ẇ z + ḃ)
        lse_dot = jnp.sum(p * s_dot, axis=-1, keepdims=True)
        s_dot_y = jnp.sum(jnp.where(e_y, s_dot, 0), axis=-1, keepdims=True)
        return jnp.where(_valid(y, k), lse_dot - s_dot_y, jnp.nan), lse_dot

    loss_dot, lse_dot = by_row_blocks(block, chunk_size, Z.shape[0],
                                      (Z, Y, lse.reshape(-1, 1), z_dot.reshape(Z.shape)),
                                      (params, params_dot))
    return loss_dot.reshape(y.shape).astype(z.dtype), lse_dot.reshape(y.shape)


_lce_with_lse.defrules(_lce_with_lse_fwd, _lce_with_lse_bwd, _lce_with_lse_jvp)


@functools.partial(custom_rules, nondiff_argnames=("chunk_size",), batch_argnums=(1, 2))
def _linear_cross_entropy(params, z, y, chunk_size):
    return _lce_with_lse(params, z, y, chunk_size)[0]


def _linear_cross_entropy_fwd(params, z, y, chunk_size):
    loss, lse = _lce_with_lse(params, z, y, chunk_size)
    return loss, (params, z, y, lse)     # residuals: lse (one per row) and the inputs


def _linear_cross_entropy_bwd(chunk_size, res, v):
    return _lce_with_lse_bwd(chunk_size, res, (v, None))            # lse̅ = 0


def _linear_cross_entropy_jvp(chunk_size, res, params_dot, z_dot, y_dot):
    return _lce_with_lse_jvp(chunk_size, res, params_dot, z_dot, y_dot)[0]


_linear_cross_entropy.defrules(_linear_cross_entropy_fwd, _linear_cross_entropy_bwd,
                               _linear_cross_entropy_jvp)


def linear_cross_entropy(params, z, y, chunk_size=256):
    r"""``cross_entropy_loss(mm(params, z), y)``, fused: the logits are never held whole.

    For rows ``z_i`` (the leading axes of ``z``: tokens, examples) and ``s_i = W z_i + b``,
    ``ℓ_i = logsumexp(s_i) − s_{i, y_i}``; with ``g_i = v_i (softmax(s_i) − e_{y_i})``:

    .. math::
        B[\ell, z_i](v) = W^\top g_i, \quad B[\ell, W](v) = \textstyle\sum_i g_i z_i^\top,
        \quad B[\ell, b](v) = \textstyle\sum_i g_i ; \qquad
        \dot\ell_i = \langle \mathrm{softmax}(s_i) - e_{y_i},\ W \dot z_i + \dot W z_i
        + \dot b \rangle .

    Forward, backward and JVP each recompute the logits ``chunk_size`` rows at a time, so the
    largest temporary is (``chunk_size`` × classes), not (rows × classes); the backward sums
    ``W̄`` and ``b̄`` over the blocks. Residuals: one log-sum-exp per row (the inputs are
    referenced, not copied). The price: the backward multiplies by ``W`` once more than
    autodiff of ``cross_entropy_loss(mm(...))`` (docs/losses.md measures both).

    Args:
      params: ``{"W": (k, m)}`` or ``{"W": (k, m), "b": (k,)}``: ``k`` classes (a vocabulary).
      z: ``(m,)`` or ``(..., m)``: one row per example (or token).
      y: integer labels in ``0..k−1`` of shape ``z.shape[:-1]``.
      chunk_size: static rows per block (≥ 1).

    Returns:
      One loss per row, ``z.shape[:-1]``; NaN for a traced label outside ``0..k−1``.

    Raises:
      TypeError / ValueError: ``params`` keys or shapes, ``z`` not floating, ``y`` not integer
        or of the wrong shape, a concrete label out of range, ``chunk_size`` not an integer ≥ 1.
    """
    p = arguments.params_dict(params, "params", ("W",), ("b",))
    z = arguments.float_array(z, "z", min_ndim=1)
    arguments.ndim(p["W"], "params['W']", 2)
    k, m = p["W"].shape
    if z.shape[-1] != m or ("b" in p and p["b"].shape != (k,)):
        raise ValueError(f"linear_cross_entropy: params['W'] {p['W'].shape} needs z (..., {m}) "
                         f"and params['b'] ({k},); got z {z.shape}"
                         + (f", b {p['b'].shape}" if "b" in p else ""))
    y = arguments.labels(y, "y", k)
    if y.shape != z.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: y must have shape z.shape[:-1] = "
                         f"{z.shape[:-1]} (one label per row of z {z.shape}), got {y.shape}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be an integer ≥ 1, "
                         f"got {chunk_size!r}")
    params, z = arguments.promote(p, z)
    return apply(_linear_cross_entropy, params, z, y, chunk_size=int(chunk_size))


declare(linear_cross_entropy, core=_linear_cross_entropy, num_arrays=3,
        reference=reference.linear_cross_entropy,
        examples=lambda rng: [({"W": normal(rng, 7, 5), "b": normal(rng, 7)}, normal(rng, 5),
                               np.int32(3)),
                              ({"W": normal(rng, 6, 3)}, normal(rng, 2, 5, 3),
                               rng.integers(0, 6, (2, 5)).astype(np.int32))],
        hyper=({"chunk_size": 4},), family="losses", section="fused-linear-cross-entropy",
        shapes="`{\"W\": (k, m), \"b\": (k,)}`, `z (..., m)`, integer `y (...)`",
        backward="`Wᵀ g`, `Σ g zᵀ`, `Σ g`; `g = (softmax(Wz+b) − e_y) v`, by blocks",
        tangent="`⟨softmax(s) − e_y, W ż + Ẇ z + ḃ⟩`, by blocks")

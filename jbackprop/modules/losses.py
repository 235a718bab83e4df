"""Per-example losses (notes 7.1–7.7, 7.70–7.71); derivations in docs/losses.md.

Each loss maps one example's model output ``t`` and target ``y`` to a scalar ``ℓ(t, y)``; extra
leading axes are a batch and give one loss per example (the batch shape). The dataset loss is
the mean over examples (7.2), taken by the user: ``jnp.mean(jb.cross_entropy_loss(T, Y))``.

A loss has a scalar output, so ``B[ℓ, t](v) = ∂ℓ/∂t · v`` (7.59) with a scalar ``v`` per example.

* ``mse_loss``: ``½‖t − y‖²``; ``B[ℓ, t](v) = (t − y) v``, ``B[ℓ, y](v) = −(t − y) v``.
* ``logistic_loss``: ``log(1 + e^t) − y t``; ``B[ℓ, t](v) = (σ(t) − y) v`` (7.70).
* ``cross_entropy_loss``: ``logsumexp(t) − t_y``; ``B[ℓ, t](v) = (softmax(t) − e_y) v`` (7.71).
* ``linear_cross_entropy`` (in ``fused_loss.py``): ``cross_entropy_loss(mm(params, z), y)``
  fused, by blocks of rows, so that neither direction holds the (examples × classes) logits.

Integer labels are not differentiable: their cotangent is ``None`` (a zero cotangent to
``custom_vjp``). Labels out of range raise ``ValueError`` when concrete; when traced (under
``jax.jit``) they make that example's loss and gradient NaN instead of a silently wrong number.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop import reference
from jbackprop._compat import Tracer
from jbackprop.modules import arguments
from jbackprop.modules.registry import declare, normal
from jbackprop.modules.rules import custom_rules
from jbackprop.modules.wiring import apply

# The public modules, re-exported by jbackprop.
__all__ = ["mse_loss", "logistic_loss", "cross_entropy_loss"]


def _compute_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)      # reductions in at least float32


def _same_shape(t, y, name, what="t"):
    if t.shape != y.shape:
        raise ValueError(f"{name}: y must have the shape of {what} {t.shape}, got y {y.shape} "
                         "(no broadcasting: a (B,) target against a (B, 1) output is a bug)")


# --- squared error: ℓ = ½‖t − y‖² over the last axis (or ½(t − y)² for a scalar t) ----------
@custom_rules      # (a scalar t is summed over no axis: a leading batch axis is not a batch)
def _mse(t, y):
    d = t - y
    sq = 0.5 * jnp.square(d.astype(_compute_dtype(d.dtype)))
    return (sq.sum(axis=-1) if d.ndim else sq).astype(d.dtype)


def _mse_fwd(t, y):
    return _mse(t, y), t - y                          # residual: t − y


def _mse_bwd(d, v):
    t_bar = (d * (jnp.expand_dims(v, -1) if d.ndim else v)).astype(d.dtype)   # (t − y) v
    return t_bar, -t_bar                                             # −(t − y) v for y


def _mse_jvp(d, t_dot, y_dot):
    dc = d.astype(_compute_dtype(d.dtype))            # ℓ̇ = ⟨t − y, ṫ − ẏ⟩ (over the last axis)
    prod = dc * (t_dot - y_dot)
    return (prod.sum(axis=-1) if d.ndim else prod).astype(d.dtype)


_mse.defrules(_mse_fwd, _mse_bwd, _mse_jvp)


def mse_loss(t, y):
    r"""Squared error ``ℓ = ½‖t − y‖²`` (7.1) for one example; ``B[ℓ, t](v) = (t − y) v``.

    The cotangent of the (real) target is ``B[ℓ, y](v) = −(t − y) v``. Residual: ``t − y``.

    Args:
      t: the model output: a scalar, or a vector ``(k,)``; extra leading axes ``(..., k)``
        are a batch (so a batch of scalar outputs is ``(B, 1)``, or use ``jax.vmap``).
      y: the float target, of exactly the shape of ``t`` (no broadcasting).

    Returns:
      ``()`` per example: ``t.shape[:-1]`` (``()`` for a scalar ``t``), in the common dtype.

    Raises:
      TypeError: ``t`` or ``y`` is not floating. ValueError: their shapes differ.
    """
    t = arguments.float_array(t, "t")
    y = arguments.float_array(y, "y")
    _same_shape(t, y, "mse_loss")
    return apply(_mse, *arguments.promote(t, y))


declare(mse_loss, core=_mse, num_arrays=2, reference=reference.mse_loss,
        examples=lambda rng: [(normal(rng, m), normal(rng, m)) for m in (5, 16)],
        family="losses", section="squared-error", shapes="`½‖t − y‖²`, `t, y (k,)`",
        backward="`(t − y) v`; `−(t − y) v` for `y`", tangent="`⟨t − y, ṫ − ẏ⟩`")


# --- logistic: ℓ = log(1 + e^t) − y t = max(t, 0) − y t + log1p(e^{−|t|}) ---------------------
def _label_float(y, dtype):
    """The label as a float of ``dtype`` and the mask of valid labels ``0 ≤ y ≤ 1``."""
    y = y if y.dtype == dtype else y.astype(dtype)      # (no cast: a weak type is kept)
    return y, (y >= 0) & (y <= 1)


def _is_float(y):
    return jnp.issubdtype(y.dtype, jnp.floating)


@functools.partial(custom_rules, batch_argnums=(0, 1))   # any leading axes: a batch
def _logistic(t, y):
    yf, ok = _label_float(y, t.dtype)
    loss = (jnp.maximum(t, 0) - yf * t) + jnp.log1p(jnp.exp(-jnp.abs(t)))
    return jnp.where(ok, loss, jnp.nan)


def _logistic_fwd(t, y):
    return _logistic(t, y), (t, y)                    # residuals: t and y (inputs, no copy)


def _logistic_bwd(res, v):
    t, y = res
    yf, ok = _label_float(y, t.dtype)
    # σ(t) − y = (1 − y) σ(t) − y σ(−t): exact for y ∈ {0, 1} even where σ(t) rounds to 1
    d = (1 - yf) * jax.lax.logistic(t) - yf * jax.lax.logistic(-t)
    t_bar = jnp.where(ok, d * v, jnp.nan)
    y_bar = jnp.where(ok, -t * v, jnp.nan) if _is_float(y) else None   # None: integer label
    return t_bar, y_bar


def _logistic_jvp(res, t_dot, y_dot):
    t, y = res
    yf, ok = _label_float(y, t.dtype)
    d = (1 - yf) * jax.lax.logistic(t) - yf * jax.lax.logistic(-t)   # σ(t) − y, as in the bwd
    loss_dot = d * t_dot - (t * y_dot if _is_float(y) else 0)      # (σ(t) − y) ṫ − t ẏ
    return jnp.where(ok, loss_dot, jnp.nan).astype(t.dtype)


_logistic.defrules(_logistic_fwd, _logistic_bwd, _logistic_jvp)


def logistic_loss(t, y):
    r"""Logistic loss ``ℓ = −log p(y | t) = log(1 + e^t) − y t`` (7.4) for a logit ``t``.

    ``B[ℓ, t](v) = (σ(t) − y) v`` (7.70), ``σ(t) = 1/(1 + e^{−t})``; for a float label also
    ``B[ℓ, y](v) = −t v``. Written as ``max(t, 0) − y t + log1p(e^{−|t|})``: no overflow and
    no cancellation for any ``|t|`` (1e4, 1e30 in float64). Residuals: ``t`` and ``y``.

    Args:
      t: the logit, a scalar; extra leading axes are a batch (any shape).
      y: the label, of exactly the shape of ``t``: integer/bool in {0, 1} (cotangent ``None``)
        or float in [0, 1] (soft labels; cotangent ``−t v``).

    Returns:
      The shape of ``t``. Under ``jax.jit`` a label outside [0, 1] gives NaN (loss and gradient).

    Raises:
      TypeError: ``t`` is not floating, or ``y`` is neither float, integer nor bool.
      ValueError: the shapes differ, or a concrete ``y`` lies outside [0, 1].
    """
    t = arguments.float_array(t, "t")
    if not isinstance(y, Tracer):       # concrete, also when closed over by jax.jit: check it
        y_np = np.asarray(y)            # before it becomes a (traced) JAX constant
        if np.issubdtype(y_np.dtype, np.number) or y_np.dtype == np.bool_:
            bad = ~((y_np >= 0) & (y_np <= 1))        # also catches NaN
            if bad.any():
                raise ValueError(f"logistic_loss: y must be in [0, 1] (a label in {{0, 1}} or a "
                                 f"soft label), got {y_np[bad].ravel()[:5].tolist()}")
    y = jnp.asarray(y)
    if not (_is_float(y) or jnp.issubdtype(y.dtype, jnp.integer) or y.dtype == jnp.bool_):
        raise TypeError(f"logistic_loss: y must be a label in {{0, 1}} (integer or bool) or "
                        f"a float in [0, 1], got dtype {y.dtype}")
    _same_shape(t, y, "logistic_loss")
    return apply(_logistic, *arguments.promote(t, y))


declare(logistic_loss, core=_logistic, num_arrays=2, reference=reference.logistic_loss,
        examples=lambda rng: [(normal(rng), np.float64(0.0)), (normal(rng, 4), np.ones(4))],
        nondiff=(1,), family="losses", section="logistic-loss",
        shapes="logit `t`, label `y ∈ {0, 1}` (or soft, in [0, 1]) of `t`'s shape",
        backward="`(sigmoid(t) − y) v`; `−t v` for a float `y`",
        tangent="`(sigmoid(t) − y) ṫ − t ẏ`")


# --- cross-entropy: ℓ = logsumexp(t) − t_y, computed on s = t − max(t) -----------------------
def _shifted(t):
    """``s = t − max(t)``, ``e^s`` and ``Σ e^s`` (in at least float32): nothing exceeds 0 in exp.

    One exponential per logit serves both the loss (``log Σ e^s``) and the residual
    (``softmax = e^s / Σ e^s``).
    """
    tc = t.astype(_compute_dtype(t.dtype))
    s = tc - jnp.max(tc, axis=-1, keepdims=True)
    e = jnp.exp(s)
    return s, e, jnp.sum(e, axis=-1)


def _valid(y, k):
    return (y >= 0) & (y < k)


@functools.partial(custom_rules, batch_argnums=(0, 1))   # any leading axes: a batch
def _cross_entropy(t, y):
    k = t.shape[-1]
    s, _, total = _shifted(t)
    lse = jnp.log(total)
    s_y = jnp.take_along_axis(s, jnp.clip(y, 0, k - 1)[..., None], axis=-1)[..., 0]
    loss = jnp.where(_valid(y, k), lse - s_y, jnp.nan)      # (lse of s) − s_y: no cancellation
    return loss.astype(t.dtype)


def _cross_entropy_fwd(t, y):
    _, e, total = _shifted(t)                                # as in the core: XLA CSEs them
    p = e / total[..., None]                                 # softmax(t) = e^s / Σ e^s
    return _cross_entropy(t, y), (p.astype(t.dtype), y)      # residuals: softmax(t) and y


def _cross_entropy_bwd(res, v):
    p, y = res
    k = p.shape[-1]
    e_y = jnp.arange(k) == y[..., None]
    t_bar = (p.astype(_compute_dtype(p.dtype)) - e_y) * jnp.expand_dims(v, -1)  # (φ − e_y) v
    t_bar = jnp.where(_valid(y, k)[..., None], t_bar, jnp.nan)
    return t_bar.astype(p.dtype), None                                 # None: integer label


def _cross_entropy_jvp(res, t_dot, y_dot):
    p, y = res
    k = p.shape[-1]
    tc = t_dot.astype(_compute_dtype(p.dtype))
    t_y = jnp.take_along_axis(tc, jnp.clip(y, 0, k - 1)[..., None], axis=-1)[..., 0]
    loss_dot = jnp.sum(p.astype(tc.dtype) * tc, axis=-1) - t_y     # ⟨φ − e_y, ṫ⟩
    return jnp.where(_valid(y, k), loss_dot, jnp.nan).astype(p.dtype)


_cross_entropy.defrules(_cross_entropy_fwd, _cross_entropy_bwd, _cross_entropy_jvp)


def cross_entropy_loss(t, y):
    r"""Cross-entropy ``ℓ = −log softmax(t)_y = logsumexp(t) − t_y`` (7.6) for logits ``t``.

    ``B[ℓ, t](v) = (softmax(t) − e_y) v`` (7.71); the integer label's cotangent is ``None``.
    Computed on ``s = t − max(t)``, as ``log Σ e^s − s_y``: stable for logits of any
    magnitude (1e4; 1e30 in float64). Residuals: ``softmax(t)`` and ``y``.

    Args:
      t: logits ``(k,)``; extra leading axes ``(..., k)`` are a batch.
      y: integer class index in ``0..k−1`` (the notes count from 1), of shape ``t.shape[:-1]``.

    Returns:
      ``t.shape[:-1]``. Under ``jax.jit`` a label outside ``0..k−1`` gives NaN for that example
      (loss and gradient) rather than wrapping around or indexing out of bounds.

    Raises:
      TypeError: ``t`` is not floating, or ``y`` is not an integer array.
      ValueError: ``t`` has rank 0 or no classes, ``y``'s shape is not ``t.shape[:-1]``, or
        a concrete ``y`` lies outside ``0..k−1``.
    """
    t = arguments.float_array(t, "t", min_ndim=1)
    k = t.shape[-1]
    if k == 0:
        raise ValueError(f"cross_entropy_loss: t must have at least one class (logit), "
                         f"got shape {t.shape}")
    y = arguments.labels(y, "y", k)   # range checked when y is concrete (also if closed over by jit)
    if y.shape != t.shape[:-1]:
        raise ValueError(f"cross_entropy_loss: y must have shape t.shape[:-1] = {t.shape[:-1]} "
                         f"(one class index per row of logits t {t.shape}), got y {y.shape}")
    return apply(_cross_entropy, t, y)


declare(cross_entropy_loss, core=_cross_entropy, num_arrays=2,
        reference=reference.cross_entropy_loss,
        examples=lambda rng: [(normal(rng, k), np.int32(k // 2)) for k in (5, 16)],
        family="losses", section="cross-entropy-loss",
        shapes="logits `(k,)`, integer `y` in `0..k−1`", backward="`(softmax(t) − e_y) v`",
        tangent="`⟨softmax(t) − e_y, ṫ⟩`")

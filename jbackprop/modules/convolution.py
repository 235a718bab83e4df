"""Convolution Conv1D-S, Conv1D, Conv2D-S, Conv2D (notes 7.48–7.51), derivations in
``docs/convolution.md``.

Every variant is a zero-padded "same" cross-correlation with an odd kernel size ``k = 2ℓ + 1``
(ℓ zeros on each side, so the output has the input's spatial size):

    Conv1D-S(z)_i = Σ_{j=1}^{k} w_j z_{i−ℓ+(j−1)} + b  = (Q z)_i + b        (7.48, 7.49)

with ``Q`` the banded Toeplitz matrix of (7.49), which is never formed. The hand-written
backward is

* ``B[·, z](v) = Qᵀ v``: the correlation of ``v`` with the spatially flipped filter, input and
  output channels swapped (the same padding ℓ);
* ``B[·, w](v)_j = Σ_i v_i z_{i−ℓ+(j−1)}``: one contraction of the padded ``z`` with ``v`` over
  the batch and the positions (and nothing per example);
* ``B[·, b](v) = Σ_i v_i``.

The hand-written JVP uses that the convolution is bilinear in ``(w, z)``: ``Q ż + Q̇ z + ḃ``,
two correlations of the forward's kind. All four cost ``O(k m)`` per channel pair and example (``O(k² h w)`` in 2-D), not ``O(m²)``.

Layout: channels last, as JAX does. The notes write the Conv2D filters as ``C × C' × k × k``;
here they are stored ``(k, k, C, C')`` (and ``(k, C, C')`` in 1-D), the input is ``(…, m, C)``
or ``(…, h, w, C)``. Extra leading axes of ``z`` are a batch; under ``jax.vmap`` the module is
called once on the whole batch (see ``wiring``), so the weight gradient is one convolution
contracting batch and positions.

One pair of helpers, ``_forward`` and ``_backward``, works on the canonical shapes
``w: (*K, C, C2)``, ``b: (C2,)``, ``z: (..., *S, C)`` for ``N = 1`` or ``2`` spatial axes. Two
``custom_rules`` cores call them: ``_conv`` (Conv1D and Conv2D, whose shapes are already
canonical) and ``_conv_s`` (the single-channel variants, which add and remove the unit channel
axes around the helpers so that their parameters and gradients keep the notes' shapes).

Against ``jax.grad`` of ``lax.conv_general_dilated`` (what Flax and Equinox users write) this
backward is at parity, not ahead: JAX's own transpose rules for the convolution are the same
two convolutions, and XLA compiles both to the same operations (the same three convolutions,
the same layout copies), so there is nothing left to save — see ``docs/benchmarks.md``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jbackprop import reference
from jbackprop.modules import arguments
from jbackprop.modules.registry import declare, normal
from jbackprop.modules.rules import custom_rules
from jbackprop.modules.wiring import apply, sharded_like

# The public modules, re-exported by jbackprop.
__all__ = ["conv1d_s", "conv1d", "conv2d_s", "conv2d"]

_SPATIAL = {1: "W", 2: "HW"}   # spatial letters of lax.conv_general_dilated's dimension specs


def _flat(x, n):
    """``(..., *S, C)`` → ``(B, *S, C)``: the leading batch axes flattened into one."""
    lead = x.shape[:x.ndim - n - 1]
    return x.reshape((math.prod(lead),) + x.shape[x.ndim - n - 1:])


def _forward(w, b, z):
    """``u = corr(z_padded, w) + b`` on canonical shapes; one convolution for the whole batch."""
    n = w.ndim - 2
    ell = w.shape[0] // 2
    sp = _SPATIAL[n]
    u = lax.conv_general_dilated(
        _flat(z, n), w, window_strides=(1,) * n, padding=[(ell, ell)] * n,
        dimension_numbers=("N" + sp + "C", sp + "IO", "N" + sp + "C"))
    return u.reshape(z.shape[:-1] + w.shape[-1:]) + b


def _backward(w, z, v):
    """``(B[·, w](v), B[·, b](v), B[·, z](v))`` on canonical shapes, written from the maths.

    With ``u_{i,c'} = Σ_{j,c} w_{j,c,c'} z_{i−ℓ+j, c} + b_{c'}`` (``j = 0..k−1``, zero padding):

    * ``z̄_{p,c} = Σ_{i,c'} v_{i,c'} w_{p−i+ℓ, c, c'} = Σ_{j,c'} w_{k−1−j, c, c'} v_{p−ℓ+j, c'}``:
      the same-padded correlation of ``v`` with the flipped filter read as ``(K, C', C)``
      (the kernel spec ``…OI`` swaps in/out channels without a transpose);
    * ``w̄_{j,c,c'} = Σ_{n,i} v_{n,i,c'} z_{n,i−ℓ+j,c}``: a correlation of the padded ``z`` with
      ``v`` as the kernel, in which the batch ``n`` is the contracted feature axis and the
      channel ``c`` plays the batch; its output has exactly the shape ``(*K, C, C')``;
    * ``b̄_{c'} = Σ_{n,i} v_{n,i,c'}``.
    """
    if z.size == 0:   # nothing to correlate (an empty signal or batch): XLA rejects such convs
        return jnp.zeros_like(w), jnp.zeros(w.shape[-1:], v.dtype), jnp.zeros_like(z)
    n = w.ndim - 2
    ell = w.shape[0] // 2
    sp = _SPATIAL[n]
    strides, pad = (1,) * n, [(ell, ell)] * n
    zf, vf = _flat(z, n), _flat(v, n)
    w_flip = jnp.flip(w, axis=tuple(range(n)))
    z_bar = lax.conv_general_dilated(                       # Qᵀ v
        vf, w_flip, strides, pad, dimension_numbers=("N" + sp + "C", sp + "OI", "N" + sp + "C"))
    w_bar = lax.conv_general_dilated(                       # Σ_{n,i} v_i z_{i−ℓ+j}
        zf, vf, strides, pad, dimension_numbers=("C" + sp + "N", "I" + sp + "O", sp + "NC"),
        **sharded_like(w))                                  # (explicit meshes: w's sharding)
    b_bar = v.sum(axis=tuple(range(v.ndim - 1)))            # Σ_{n,i} v_i
    return w_bar, b_bar, z_bar.reshape(z.shape)


# --- Conv1D / Conv2D: canonical shapes ----------------------------------------------------
@functools.partial(custom_rules, batch_argnums=(1,))
def _conv(params, z):
    return _forward(params["w"], params["b"], z)


def _conv_fwd(params, z):
    return _conv(params, z), (params["w"], z)        # residuals: w and z (nothing new)


def _conv_bwd(res, v):
    w, z = res
    w_bar, b_bar, z_bar = _backward(w, z, v)
    return {"w": w_bar, "b": b_bar}, z_bar


def _conv_jvp(res, params_dot, z_dot):
    w, z = res                                        # Q ż + ḃ  +  (Q̇ z): the conv is bilinear
    return _forward(w, params_dot["b"], z_dot) + _forward(params_dot["w"], 0, z)


_conv.defrules(_conv_fwd, _conv_bwd, _conv_jvp)


# --- Conv1D-S / Conv2D-S: one channel in, one out ----------------------------------------
@functools.partial(custom_rules, batch_argnums=(1,))
def _conv_s(params, z):
    w, b = params["w"], params["b"]
    return _forward(w[..., None, None], b[None], z[..., None])[..., 0]


def _conv_s_fwd(params, z):
    return _conv_s(params, z), (params["w"], z)      # residuals: w and z (nothing new)


def _conv_s_bwd(res, v):
    w, z = res
    w_bar, b_bar, z_bar = _backward(w[..., None, None], z[..., None], v[..., None])
    return {"w": w_bar[..., 0, 0], "b": b_bar[0]}, z_bar[..., 0]


def _conv_s_jvp(res, params_dot, z_dot):
    w, z = res                                        # Q ż + ḃ + Q̇ z, with unit channel axes
    w_dot, b_dot = params_dot["w"][..., None, None], params_dot["b"][None]
    u_dot = _forward(w[..., None, None], b_dot, z_dot[..., None]) + \
        _forward(w_dot, 0, z[..., None])
    return u_dot[..., 0]


_conv_s.defrules(_conv_s_fwd, _conv_s_bwd, _conv_s_jvp)


def _arguments(name, params, z, n, single):
    """Check one call (trace time); return ``(params, z)`` in their common floating dtype."""
    p = arguments.params_dict(params, "params", ("w", "b"))
    w, b = p["w"], p["b"]
    z = arguments.float_array(z, "z", min_ndim=n if single else n + 1)
    arguments.ndim(w, "params['w']", n if single else n + 2)
    ks = w.shape[:n]
    if len(set(ks)) > 1:
        raise ValueError(f"{name}: params['w'] has shape {w.shape}, a rectangular "
                         f"{' × '.join(map(str, ks))} kernel; the kernel must be square, k × k")
    k = ks[0]
    if k % 2 == 0:
        raise ValueError(f"{name}: params['w'] has shape {w.shape}, kernel size k={k}; k must "
                         "be odd (k = 2ℓ + 1) so that padding ℓ zeros on each side keeps the "
                         "input's size")
    if single:
        b_shape = ()
    else:
        C, C2 = w.shape[-2:]
        if z.shape[-1] != C:
            raise ValueError(f"{name}: params['w'] has shape {w.shape} (C={C} input channels) "
                             f"but z has shape {z.shape}; z's last axis must have size C={C}")
        b_shape = (C2,)
    if b.shape != b_shape:
        raise ValueError(f"{name}: params['b'] must have shape {b_shape} to match params['w'] "
                         f"{w.shape}, got {b.shape}")
    return arguments.promote({"w": w, "b": b}, z)   # one dtype inside the core


def conv1d_s(params, z):
    r"""Conv1D-S (7.48): one-channel 1-D cross-correlation with zero "same" padding.

    With ``k = 2ℓ + 1`` and ``z_{1−ℓ} = … = z_0 = z_{m+1} = … = z_{m+ℓ} = 0``:

    .. math::
        \mathrm{Conv1D\text{-}S}(z)_i = \sum_{j=1}^{k} w_j z_{i-\ell+(j-1)} + b = (Qz)_i + b,

    .. math::
        B[\cdot, z](v) = Q^\top v = \mathrm{corr}(v, \mathrm{flip}(w)), \quad
        B[\cdot, w](v)_j = \sum_i v_i z_{i-\ell+(j-1)}, \quad B[\cdot, b](v) = \sum_i v_i,

    with ``Q`` the banded Toeplitz matrix (7.49), never formed: cost ``O(km)``, not ``O(m²)``.
    Residuals saved by the forward: ``w`` and ``z``.

    Args:
      params: ``{"w": (k,), "b": ()}``, ``k`` odd (it may exceed ``m``).
      z: input ``(m,)``, or ``(..., m)`` with leading batch axes.

    Returns:
      ``(m,)`` (or ``(..., m)``), in the promoted dtype of ``w``, ``b`` and ``z``.

    Raises:
      TypeError / ValueError: wrong ``params`` keys, ranks or ``b`` shape, an even ``k``, or a
        non-floating ``z``.
    """
    params, z = _arguments("conv1d_s", params, z, 1, single=True)
    return apply(_conv_s, params, z)


def conv1d(params, z):
    r"""Conv1D (7.50): ``C`` input channels to ``C'`` output channels, channels last.

    .. math::
        \mathrm{Conv1D}(z)_{i,c'} = \sum_{c=1}^{C} \sum_{j=1}^{k} w_{j,c,c'} z_{i-\ell+(j-1),c}
        + b_{c'} = \sum_c \mathrm{Conv1D\text{-}S}_{c,c'}(z_{:,c}) + b_{c'},

    .. math::
        B[\cdot, z](v)_{:,c} = \sum_{c'} Q_{c,c'}^\top v_{:,c'}, \quad
        B[\cdot, w](v)_{j,c,c'} = \sum_i v_{i,c'} z_{i-\ell+(j-1),c}, \quad
        B[\cdot, b](v)_{c'} = \sum_i v_{i,c'}.

    The filters form a ``k × C × C'`` tensor (``kCC'`` parameters), stored with the channel
    axes last as JAX does. Residuals saved by the forward: ``w`` and ``z``. Cost
    ``O(k m C C')``. Leading batch axes of ``z`` are summed over in the weight gradient by one
    convolution (also under ``jax.vmap``).

    Args:
      params: ``{"w": (k, C, C'), "b": (C',)}``, ``k`` odd (it may exceed ``m``).
      z: input ``(m, C)``, or ``(..., m, C)`` with leading batch axes.

    Returns:
      ``(m, C')`` (or ``(..., m, C')``), in the promoted dtype of ``w``, ``b`` and ``z``.

    Raises:
      TypeError / ValueError: wrong ``params`` keys, ranks or ``b`` shape, an even ``k``, a
        channel mismatch between ``w`` and ``z``, or a non-floating ``z``.
    """
    params, z = _arguments("conv1d", params, z, 1, single=False)
    return apply(_conv, params, z)


def conv2d_s(params, z):
    r"""Conv2D-S: one-channel 2-D cross-correlation, ``k × k`` filter, zero "same" padding.

    .. math::
        \mathrm{Conv2D\text{-}S}(z)_{p,q} = \sum_{a=1}^{k}\sum_{c=1}^{k}
        w_{a,c}\, z_{p-\ell+(a-1),\, q-\ell+(c-1)} + b,

    .. math::
        B[\cdot, z](v) = \mathrm{corr}(v, \mathrm{flip}(w)), \quad
        B[\cdot, w](v)_{a,c} = \sum_{p,q} v_{p,q}\, z_{p-\ell+(a-1),\, q-\ell+(c-1)}, \quad
        B[\cdot, b](v) = \sum_{p,q} v_{p,q},

    where ``flip`` reverses both spatial axes. Residuals saved by the forward: ``w`` and
    ``z``. Cost ``O(k² h w)``.

    Args:
      params: ``{"w": (k, k), "b": ()}``, ``k`` odd (it may exceed ``h`` or ``w``).
      z: input ``(h, w)`` (rectangular allowed), or ``(..., h, w)`` with leading batch axes.

    Returns:
      ``(h, w)`` (or ``(..., h, w)``), in the promoted dtype of ``w``, ``b`` and ``z``.

    Raises:
      TypeError / ValueError: wrong ``params`` keys, ranks or ``b`` shape, a rectangular or
        even kernel, or a non-floating ``z``.
    """
    params, z = _arguments("conv2d_s", params, z, 2, single=True)
    return apply(_conv_s, params, z)


def conv2d(params, z):
    r"""Conv2D (7.51): ``C`` to ``C'`` channels, ``k × k`` filters, channels last.

    .. math::
        \mathrm{Conv2D}(z)_{p,q,c'} = \sum_{c=1}^{C}\sum_{a,d=1}^{k}
        w_{a,d,c,c'}\, z_{p-\ell+(a-1),\, q-\ell+(d-1),\, c} + b_{c'},

    .. math::
        B[\cdot, z](v) = \mathrm{corr}(v, \mathrm{flip}(w)^{c \leftrightarrow c'}), \quad
        B[\cdot, w](v)_{a,d,c,c'} = \sum_{p,q} v_{p,q,c'}\,
        z_{p-\ell+(a-1),\, q-\ell+(d-1),\, c}, \quad
        B[\cdot, b](v)_{c'} = \sum_{p,q} v_{p,q,c'}.

    The notes write the filters as ``C × C' × k × k``; they are stored ``(k, k, C, C')``,
    channels last, as JAX does (``HWIO``), and ``z`` is ``(h, w, C)`` (``NHWC``). Residuals
    saved by the forward: ``w`` and ``z``. Cost ``O(k² h w C C')``.

    Args:
      params: ``{"w": (k, k, C, C'), "b": (C',)}``, ``k`` odd (it may exceed ``h`` or ``w``).
      z: input ``(h, w, C)``, or ``(..., h, w, C)`` with leading batch axes.

    Returns:
      ``(h, w, C')`` (or ``(..., h, w, C')``), in the promoted dtype of ``w``, ``b``, ``z``.

    Raises:
      TypeError / ValueError: wrong ``params`` keys, ranks or ``b`` shape, a rectangular or
        even kernel, a channel mismatch between ``w`` and ``z``, or a non-floating ``z``.
    """
    params, z = _arguments("conv2d", params, z, 2, single=False)
    return apply(_conv, params, z)


# --- declarations ------------------------------------------------------------------------
def _declare(fn, core, examples, shapes, backward, layer=None):
    declare(fn, core=core, num_arrays=2, reference=getattr(reference, fn.__name__),
            examples=examples, family="convolution", section=fn.__name__.replace("_", "-"),
            shapes=shapes, backward=backward, tangent="`Q ż + Q̇ z + ḃ` (two correlations)",
            layer=layer)


_declare(conv1d_s, _conv_s,
         lambda rng: [({"w": normal(rng, 3), "b": normal(rng)}, normal(rng, m)) for m in (10, 32)],
         "`{\"w\": (k,), \"b\": ()}`, `z (m,)` → `(m,)`",
         "`Qᵀv` (correlation with flipped `w`), `Σ_i v_i z_{i−ℓ+j}`, `Σv`")
_declare(conv1d, _conv,
         lambda rng: [({"w": normal(rng, 3, 2, 4), "b": normal(rng, 4)}, normal(rng, m, 2))
                      for m in (5, 16)],
         "`{\"w\": (k, C, C2), \"b\": (C2,)}`, `z (m, C)` → `(m, C2)`",
         "per channel pair as Conv1D-S, summed", layer="Conv1D")
_declare(conv2d_s, _conv_s,
         lambda rng: [({"w": normal(rng, 3, 3), "b": normal(rng)}, normal(rng, h, 6)) for h in (5, 16)],
         "`{\"w\": (k, k), \"b\": ()}`, `z (h, w)` → `(h, w)`",
         "correlation with the flipped filter; `Σ v z` shifted; `Σv`")
_declare(conv2d, _conv,
         lambda rng: [({"w": normal(rng, 3, 3, 2, 3), "b": normal(rng, 3)}, normal(rng, h, 6, 2))
                      for h in (5, 16)],
         "`{\"w\": (k, k, C, C2), \"b\": (C2,)}`, `z (h, w, C)` → `(h, w, C2)`",
         "per channel pair as Conv2D-S, summed", layer="Conv2D")

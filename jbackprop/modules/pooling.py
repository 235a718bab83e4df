"""Max and average pooling in one and two dimensions; derivations in docs/pooling.md.

``z`` is ``(m, C)`` (1-D) or ``(h, w, C)`` (2-D), channels last as in the notes' Conv1D/Conv2D;
windows of ``window`` positions (per spatial axis) every ``stride`` positions (default: the
window, i.e. non-overlapping), no padding: ``⌊(m − window)/stride⌋ + 1`` outputs per axis.

* Max pooling: ``u_l = max_{i ∈ window l} z_i`` per channel. ``B[max, z](v)`` routes each
  ``v_l`` to the arg-max of its window (added up where windows overlap); the JVP reads ``ż``
  there. **Ties**: the first maximal position of a window (the lowest index; in 2-D the first
  in row-major order), as ``jnp.argmax``. Residual: the arg-max positions (one integer per
  output).
* Average pooling: ``u_l = (1/|window|) Σ_{i ∈ window l} z_i``: linear, so the JVP is the
  forward applied to ``ż`` and ``B[avg, z](v)`` spreads ``v_l/|window|`` over window ``l``.
  Residual: none (the input's length, as a zero-byte shape).

Leading axes before the spatial ones are a batch.
"""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from jbackprop import reference
from jbackprop.modules import arguments
from jbackprop.modules.registry import declare, normal
from jbackprop.modules.rules import custom_rules
from jbackprop.modules.wiring import apply, sharded_like

# The public modules, re-exported by jbackprop.
__all__ = ["max_pool1d", "avg_pool1d", "max_pool2d", "avg_pool2d"]


# --- windows: the bookkeeping shared by both poolings ----------------------------------------
def _starts(n, window, stride):
    """``(L, window)``: the positions of each window along one axis of length ``n``."""
    count = (n - window) // stride + 1
    return stride * np.arange(count)[:, None] + np.arange(window)[None, :]


def _flat_windows(spatial, window, stride):
    """``(L, K)``: for every output position (row-major) the flat input positions of its
    window (row-major, so the first maximal one is ``jnp.argmax``'s)."""
    per_axis = [_starts(n, w, s) for n, w, s in zip(spatial, window, stride)]
    if len(per_axis) == 1:
        return per_axis[0]
    rows, cols = per_axis                             # (L1, w1), (L2, w2)
    flat = rows[:, None, :, None] * spatial[1] + cols[None, :, None, :]   # (L1, L2, w1, w2)
    return flat.reshape(rows.shape[0] * cols.shape[0], -1)


def _batch_flat(z, dims):
    """``z (..., *spatial, C)`` as ``(B, prod(spatial), C)``."""
    lead = z.shape[:z.ndim - dims - 1]
    return z.reshape(math.prod(lead), -1, z.shape[-1]), lead


def _out_shape(lead, spatial, window, stride, channels):
    return (*lead, *((n - w) // s + 1 for n, w, s in zip(spatial, window, stride)), channels)


# --- max pooling -------------------------------------------------------------------------------
def _maxima(z, window, stride):
    """``(u, positions)``: each window's maximum and the flat position of its first arg-max."""
    dims = len(window)
    spatial = z.shape[-dims - 1:-1]
    idx = _flat_windows(spatial, window, stride)      # (L, K)
    zf, lead = _batch_flat(z, dims)                   # (B, S, C)
    windows = zf[:, idx, :]                           # (B, L, K, C)
    first = jnp.argmax(windows, axis=2)               # the first maximal position in a window
    # its flat position in 0..S−1, (B, L, C): the window's start idx[l, 0] plus the offset of
    # row-major entry ``first`` of a window (arithmetic, not a gather: sharding-neutral)
    offset = (first // window[-1]) * spatial[-1] + first % window[-1]
    pos = jnp.asarray(idx[:, 0])[:, None] + offset
    u = jnp.take_along_axis(zf, pos, axis=1)
    return u.reshape(_out_shape(lead, spatial, window, stride, z.shape[-1])), pos


@functools.partial(custom_rules, nondiff_argnames=("window", "stride"), batch_argnums=(0,))
def _max_pool(z, window, stride):
    return _maxima(z, window, stride)[0]


def _max_pool_fwd(z, window, stride):
    pos = _maxima(z, window, stride)[1]               # the same ops as the core's: XLA CSEs them
    size = jnp.zeros((0, *z.shape), z.dtype)          # z's shape as a zero-byte array
    return _max_pool(z, window, stride), (pos, size)  # residuals: the arg-max positions


def _max_pool_bwd(window, stride, res, v):
    pos, size = res                                   # B[max, z](v): v_l to the arg-max of l
    z_shape = size.shape[1:]
    vf = v.reshape(pos.shape)
    B, _, C = pos.shape
    z_bar = jnp.zeros((B, math.prod(z_shape) // (B * C), C), v.dtype)
    z_bar = z_bar.at[jnp.arange(B)[:, None, None], pos, jnp.arange(C)].add(
        vf, **sharded_like(vf))                       # (explicit meshes: laid out as v)
    return (z_bar.reshape(z_shape),)


def _max_pool_jvp(window, stride, res, z_dot):
    pos, _ = res                                      # u̇_l = ż at the arg-max of window l
    zf, lead = _batch_flat(z_dot, len(window))
    u_dot = jnp.take_along_axis(zf, pos, axis=1)
    return u_dot.reshape(_out_shape(lead, z_dot.shape[len(lead):-1], window, stride,
                                    z_dot.shape[-1]))


_max_pool.defrules(_max_pool_fwd, _max_pool_bwd, _max_pool_jvp)


# --- average pooling ---------------------------------------------------------------------------
def _average(z, window, stride):
    """``(1/K) Σ_{i ∈ window l} z_i``: the forward, and (being linear) the JVP."""
    dims = len(window)
    spatial = z.shape[-dims - 1:-1]
    idx = _flat_windows(spatial, window, stride)
    zf, lead = _batch_flat(z, dims)
    u = zf[:, idx, :].mean(axis=2)                    # (B, L, C)
    return u.reshape(_out_shape(lead, spatial, window, stride, z.shape[-1]))


@functools.partial(custom_rules, nondiff_argnames=("window", "stride"), batch_argnums=(0,))
def _avg_pool(z, window, stride):
    return _average(z, window, stride)


def _avg_pool_fwd(z, window, stride):
    size = jnp.zeros((0, *z.shape), z.dtype)          # z's shape as a zero-byte array
    return _avg_pool(z, window, stride), size         # residual: none but the shape


def _avg_pool_bwd(window, stride, size, v):
    z_shape = size.shape[1:]
    dims = len(window)
    idx = _flat_windows(z_shape[-dims - 1:-1], window, stride)          # (L, K)
    vf, _ = _batch_flat(v, dims)                      # (B, L, C)
    spread = jnp.broadcast_to(vf[:, :, None, :] / idx.shape[1],         # v_l / K, K times
                              (vf.shape[0], *idx.shape, vf.shape[-1]))
    z_bar = jnp.zeros((vf.shape[0], math.prod(z_shape[-dims - 1:-1]), vf.shape[-1]), v.dtype)
    z_bar = z_bar.at[:, idx, :].add(spread, **sharded_like(vf))        # Σ over the windows
    return (z_bar.reshape(z_shape),)


def _avg_pool_jvp(window, stride, size, z_dot):
    return _average(z_dot, window, stride)            # linear: u̇ = avg(ż)


_avg_pool.defrules(_avg_pool_fwd, _avg_pool_bwd, _avg_pool_jvp)


# --- public modules ----------------------------------------------------------------------------
def _pool_arguments(name, z, window, stride, dims):
    """Check ``z``, ``window`` and ``stride`` (ints, or pairs in 2-D); return them as tuples."""
    z = arguments.float_array(z, "z", min_ndim=dims + 1)
    spatial = z.shape[-dims - 1:-1]

    def pair(x, what):
        xs = (x,) * dims if isinstance(x, (int, np.integer)) and not isinstance(x, bool) else x
        if not (isinstance(xs, (tuple, list)) and len(xs) == dims and all(
                isinstance(a, (int, np.integer)) and not isinstance(a, bool) and a >= 1
                for a in xs)):
            raise ValueError(f"{name}: {what} must be a positive integer"
                             + (" or a pair of them" if dims == 2 else "") + f", got {x!r}")
        return tuple(int(a) for a in xs)
    window = pair(window, "window")
    stride = window if stride is None else pair(stride, "stride")
    if any(w > n for w, n in zip(window, spatial)):
        raise ValueError(f"{name}: window {window} is larger than the input's spatial shape "
                         f"{spatial} (z has shape {z.shape}, channels last)")
    return z, window, stride


def max_pool1d(z, window, stride=None):
    """Max pooling over the positions of ``z (m, C)``; ``B`` routes ``v`` to each window's
    arg-max (ties: the first). Residual: the arg-max positions.

    Args:
      z: ``(m, C)``; leading axes are a batch.
      window: static window length ≤ m. stride: static, defaults to ``window``.

    Returns:
      ``(⌊(m − window)/stride⌋ + 1, C)``.

    Raises:
      ValueError / TypeError: ``window``/``stride`` not positive integers, ``window > m``.
    """
    z, window, stride = _pool_arguments("max_pool1d", z, window, stride, 1)
    return apply(_max_pool, z, window=window, stride=stride)


def avg_pool1d(z, window, stride=None):
    """Average pooling over the positions of ``z (m, C)``; ``B`` spreads ``v_l/window`` over
    window ``l``. No residual. Arguments as ``max_pool1d``."""
    z, window, stride = _pool_arguments("avg_pool1d", z, window, stride, 1)
    return apply(_avg_pool, z, window=window, stride=stride)


def max_pool2d(z, window, stride=None):
    """Max pooling over ``z (h, w, C)`` in windows of ``window`` (an int or ``(a, b)``);
    ties go to the first maximal position in row-major order. Arguments as ``max_pool1d``."""
    z, window, stride = _pool_arguments("max_pool2d", z, window, stride, 2)
    return apply(_max_pool, z, window=window, stride=stride)


def avg_pool2d(z, window, stride=None):
    """Average pooling over ``z (h, w, C)``. Arguments as ``max_pool2d``."""
    z, window, stride = _pool_arguments("avg_pool2d", z, window, stride, 2)
    return apply(_avg_pool, z, window=window, stride=stride)


def _declare(fn, core, dims, backward, tangent, kinks=""):
    shapes = "`z (m, C)`" if dims == 1 else "`z (h, w, C)`"
    # one setting each (overlapping windows for max pooling, where v can add up); the other
    # settings are in tests/test_pooling.py
    overlapping = {"window": 3, "stride": 2} if dims == 1 else {"window": (2, 3), "stride": 1}
    hyper = (overlapping,) if fn.__name__.startswith("max") else ({"window": 2},)
    examples = (lambda rng: [(normal(rng, 8, 3),), (normal(rng, 2, 7, 2),)]) if dims == 1 else \
        (lambda rng: [(normal(rng, 4, 6, 2),), (normal(rng, 5, 5, 3),)])
    declare(fn, core=core, reference=getattr(reference, fn.__name__), examples=examples,
            hyper=hyper, family="pooling", section=fn.__name__.replace("_", "-"),
            shapes=shapes + ", window, stride (default: the window)", backward=backward,
            tangent=tangent, kinks=kinks)


_MAX_KINKS = "ties in a window: the first maximal position gets `v` (as `jnp.argmax`)"
_declare(max_pool1d, _max_pool, 1, "`v` to each window's arg-max", "`ż` at the arg-max",
         _MAX_KINKS)
_declare(avg_pool1d, _avg_pool, 1, "`v_l / window` over window l", "`avg(ż)`")
_declare(max_pool2d, _max_pool, 2, "`v` to each window's arg-max", "`ż` at the arg-max",
         _MAX_KINKS)
_declare(avg_pool2d, _avg_pool, 2, "`v_l / |window|` over window l", "`avg(ż)`")

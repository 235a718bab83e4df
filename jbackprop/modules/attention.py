"""Softmax, scaled dot-product attention and multi-head attention; derivations in
docs/attention.md.

* ``softmax``: ``s = e^z / Σ e^z`` over the last axis; its Jacobian ``diag(s) − s sᵀ`` is
  symmetric, so ``B[softmax, z](v) = s ⊙ (v − ⟨s, v⟩)`` and the JVP is the same map of ``ż``.
* ``attention``: ``O = softmax(q kᵀ/√d) v`` for one sequence. Its backward keeps **O(n·d)
  memory**: it saves ``q, k, v`` and the output ``O`` (not the ``n × m`` probabilities) and
  rebuilds ``P`` block by block of query rows, as FlashAttention does.
* ``multi_head_attention``: four MMs around ``attention`` on ``num_heads`` heads; its
  backward is composed of theirs.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop import reference
from jbackprop.modules import arguments
from jbackprop.modules.linear import mm
from jbackprop.modules.registry import declare, normal
from jbackprop.modules.blocks import by_row_blocks
from jbackprop.modules.rules import custom_rules
from jbackprop.modules.wiring import apply

# The public modules, re-exported by jbackprop.
__all__ = ["softmax", "attention", "multi_head_attention_init", "multi_head_attention"]

QUERY_BLOCK = 128            # attention's default block of query rows (see ``blocks.by_row_blocks``)


def _wide(dtype):
    return jnp.promote_types(dtype, jnp.float32)      # exponentials and sums in ≥ float32


def _row_dot(a, b):
    """``⟨a_i, b_i⟩`` row by row, keeping the axis: shape ``(..., n, 1)``."""
    return jnp.sum(a * b, axis=-1, keepdims=True)


# --- softmax: s = e^z / Σ e^z over the last axis ---------------------------------------------
@functools.partial(custom_rules, batch_argnums=(0,))
def _softmax(z):
    zw = z.astype(_wide(z.dtype))
    e = jnp.exp(zw - zw.max(axis=-1, keepdims=True))  # shifted by the max: no overflow
    return (e / e.sum(axis=-1, keepdims=True)).astype(z.dtype)


def _softmax_fwd(z):
    s = _softmax(z)
    return s, s                                       # residual: s (the output)


def _softmax_bwd(s, v):
    sw = s.astype(_wide(s.dtype))                     # B[softmax, z](v) = s ⊙ (v − ⟨s, v⟩)
    return ((sw * (v - _row_dot(sw, v))).astype(s.dtype),)


def _softmax_jvp(s, z_dot):
    sw = s.astype(_wide(s.dtype))                     # ṡ = s ⊙ (ż − ⟨s, ż⟩): J is symmetric
    return (sw * (z_dot - _row_dot(sw, z_dot))).astype(s.dtype)


_softmax.defrules(_softmax_fwd, _softmax_bwd, _softmax_jvp)


def softmax(z):
    r"""Softmax over the last axis, ``s = e^z / Σ_j e^{z_j}`` (computed shifted by the max).

    .. math::
        B[\mathrm{softmax}, z](v) = s \odot (v - \langle s, v\rangle), \qquad
        \dot s = s \odot (\dot z - \langle s, \dot z\rangle).

    Residual: the output ``s``. Sums and exponentials run in at least float32.

    Args:
      z: ``(k,)``, or ``(..., k)``: leading axes are independent rows.

    Raises:
      TypeError / ValueError: ``z`` is not a floating array of rank ≥ 1 with a non-empty last
        axis.
    """
    z = arguments.float_array(z, "z", min_ndim=1)
    if z.shape[-1] == 0:
        raise ValueError(f"softmax: z's last axis must not be empty, got shape {z.shape}")
    return apply(_softmax, z)


declare(softmax, core=_softmax, reference=reference.softmax,
        examples=lambda rng: [(normal(rng, 7, 5),), (normal(rng, 3, 4, 16, scale=3.0),)],
        family="attention", section="softmax", shapes="over the last axis, any leading axes",
        backward="`s ⊙ (v − ⟨s, v⟩)`", tangent="`s ⊙ (ż − ⟨s, ż⟩)`", layer="Softmax")


# --- attention: O = softmax(q kᵀ/√d) v, by blocks of query rows ------------------------------
def _scores(q, k, rows, causal):
    """``S = q kᵀ/√d`` for the query rows ``rows`` (global indices), causal-masked to −∞."""
    s = jnp.einsum("...id,...jd->...ij", q, k) / math.sqrt(q.shape[-1])
    if causal:                                        # row i sees the keys j ≤ i
        s = jnp.where(jnp.arange(k.shape[-2]) <= rows[:, None], s, -jnp.inf)
    return s


def _shifted_exp(s):
    """``(e^{S − max S}, max S)`` row by row, shifted twice.

    XLA may fuse ``S = q kᵀ/√d`` into both the maximum and the subtraction and compute it
    twice with different roundings; at scores of 1e23 one ulp is 1e7, so the row's largest
    entry would get ``e^{±1e7}``: ``inf``, or 0 and then 0/0. The second shift, by the
    maximum of the materialised difference itself, gives that entry ``e^0 = 1`` exactly."""
    top = s.max(axis=-1, keepdims=True)               # finite: row i always sees key i
    d = jax.lax.optimization_barrier(s - top)         # ≤ 0, its maximum 0 up to that rounding
    return jnp.exp(d - d.max(axis=-1, keepdims=True)), top


def _forward_block(q, rows, k, v, causal):
    """``(O, ℓ)`` of a block of query rows: ``ℓ_i = log Σ_j e^{S_ij}``, ``O = e^{S − ℓ} v``."""
    e, top = _shifted_exp(_scores(q, k, rows, causal))
    total = e.sum(axis=-1, keepdims=True)
    return (e @ v) / total, top + jnp.log(total)


def _probabilities(q, k, rows, causal):
    """``P = softmax(S)`` of a block of query rows, recomputed from ``q`` and ``k``.

    A block holds whole rows (all ``m`` keys), so each row is normalised by its own maximum
    and sum exactly as in the forward: no ``n × m`` array is kept, and no saved statistic has
    to match a recomputed ``S`` to the last bit (a row that sees a single key is exactly
    ``e_j``, whose ``S̄`` is then exactly 0; scores of 1e24 stay finite)."""
    e, _ = _shifted_exp(_scores(q, k, rows, causal))
    return e / e.sum(axis=-1, keepdims=True)


def _backward_block(q, o_bar, lse_bar, rows, k, v, causal):
    """A block's share of the backward: ``(Q̄_block, K̄ part, V̄ part)``."""
    p = _probabilities(q, k, rows, causal)
    v_bar = jnp.einsum("...ij,...ie->...je", p, o_bar)          # V̄ = Pᵀ Ō
    p_bar = jnp.einsum("...ie,...je->...ij", o_bar, v)          # P̄ = Ō vᵀ
    delta = _row_dot(p, p_bar)                        # δ_i = ⟨P_i, P̄_i⟩ (= ⟨Ō_i, O_i⟩)
    s_bar = p * (p_bar - delta + lse_bar)             # S̄ = P ⊙ (P̄ − δ + ℓ̄)
    scale = 1 / math.sqrt(q.shape[-1])
    q_bar = scale * (s_bar @ k)                       # Q̄ = S̄ k/√d
    k_bar = scale * jnp.einsum("...ij,...id->...jd", s_bar, q)  # K̄ = S̄ᵀ q/√d
    return q_bar, k_bar, v_bar


def _tangent_block(q, q_dot, o, rows, k, v, k_dot, v_dot, causal):
    """``(Ȯ, ℓ̇)`` of a block: ``ℓ̇ = rowsum(P ⊙ Ṡ)``, ``Ȯ = (P ⊙ Ṡ) v − ℓ̇ ⊙ O + P v̇``,
    ``Ṡ = (q̇ kᵀ + q k̇ᵀ)/√d``."""
    p = _probabilities(q, k, rows, causal)
    s_dot = (jnp.einsum("...id,...jd->...ij", q_dot, k) +
             jnp.einsum("...id,...jd->...ij", q, k_dot)) / math.sqrt(q.shape[-1])
    ps = p * s_dot                                    # Ṗ = P ⊙ (Ṡ − ℓ̇)
    lse_dot = ps.sum(axis=-1, keepdims=True)
    return ps @ v - lse_dot * o + p @ v_dot, lse_dot


# The memory trick, kept apart from the calculus above: the rules run on blocks of `block_size`
# query rows (`blocks.by_row_blocks`), so the largest temporaries are (block × m), never (n × m).


# Two cores. `_attention_with_lse` returns (O, ℓ), both differentiable, with the rules below;
# `_attention` (the module) returns O, and its forward rule calls `_attention_with_lse`, so that
# under second order (jax.hessian) the tangent of O (a residual) is hand-written too.
_HYPER = ("causal", "block_size")


@functools.partial(custom_rules, nondiff_argnames=_HYPER, batch_argnums=(0, 1, 2))
def _attention_with_lse(q, k, v, causal, block_size):
    return _attention_with_lse_fwd(q, k, v, causal, block_size)[0]


def _attention_with_lse_fwd(q, k, v, causal, block_size):
    wide = _wide(q.dtype)
    qw, kw, vw = (x.astype(wide) for x in (q, k, v))
    o, lse = by_row_blocks(functools.partial(_forward_block, causal=causal), block_size,
                              q.shape[-2], (qw,), (kw, vw))
    o = o.astype(q.dtype)
    return (o, lse), (q, k, v, o)        # residuals: q, k, v (inputs) and O (the output)


def _attention_with_lse_bwd(causal, block_size, res, out_bar):
    q, k, v, _ = res                     # O is not needed: δ_i = ⟨P_i, P̄_i⟩ by blocks
    o_bar, lse_bar = out_bar
    wide = _wide(q.dtype)
    qw, kw, vw, o_bar_w = (x.astype(wide) for x in (q, k, v, o_bar))
    lse_bar = (jnp.zeros((*q.shape[:-1], 1), wide) if lse_bar is None else lse_bar.astype(wide))
    q_bar, k_bar, v_bar = by_row_blocks(
        functools.partial(_backward_block, causal=causal), block_size, q.shape[-2],
        (qw, o_bar_w, lse_bar), (kw, vw), sum_outputs=2)
    return q_bar.astype(q.dtype), k_bar.astype(k.dtype), v_bar.astype(v.dtype)


def _attention_with_lse_jvp(causal, block_size, res, q_dot, k_dot, v_dot):
    q, k, v, o = res
    wide = _wide(q.dtype)
    o_dot, lse_dot = by_row_blocks(
        functools.partial(_tangent_block, causal=causal), block_size, q.shape[-2],
        tuple(x.astype(wide) for x in (q, q_dot, o)),
        tuple(x.astype(wide) for x in (k, v, k_dot, v_dot)))
    return o_dot.astype(q.dtype), lse_dot


_attention_with_lse.defrules(_attention_with_lse_fwd, _attention_with_lse_bwd,
                             _attention_with_lse_jvp)


@functools.partial(custom_rules, nondiff_argnames=_HYPER, batch_argnums=(0, 1, 2))
def _attention(q, k, v, causal, block_size):
    return _attention_with_lse(q, k, v, causal, block_size)[0]


def _attention_fwd(q, k, v, causal, block_size):
    o, _ = _attention_with_lse(q, k, v, causal, block_size)
    return o, (q, k, v, o)               # residuals: q, k, v (inputs) and O (the output)


def _attention_bwd(causal, block_size, res, o_bar):
    return _attention_with_lse_bwd(causal, block_size, res, (o_bar, None))   # ℓ̄ = 0


def _attention_jvp(causal, block_size, res, q_dot, k_dot, v_dot):
    return _attention_with_lse_jvp(causal, block_size, res, q_dot, k_dot, v_dot)[0]


_attention.defrules(_attention_fwd, _attention_bwd, _attention_jvp)


def attention(q, k, v, causal=False, block_size=QUERY_BLOCK):
    r"""Scaled dot-product attention ``O = softmax(q kᵀ/√d) v`` (softmax over the keys).

    .. math::
        P = e^{S - \ell},\ S = q k^\top/\sqrt d; \quad
        \bar V = P^\top \bar O,\ \bar S = P \odot (\bar P - \delta),\ \bar P = \bar O v^\top,\
        \delta_i = \langle P_i, \bar P_i\rangle,\ \bar q = \bar S k/\sqrt d,\
        \bar k = \bar S^\top q/\sqrt d.

    Residuals: ``q``, ``k``, ``v`` (inputs) and the output ``O``: O(n·d) memory. The forward,
    backward and JVP run on blocks of ``block_size`` query rows, so no ``n × m`` array is ever
    held (only ``block_size × m``); the backward recomputes each block's ``P``.

    Args:
      q: queries ``(n, d)``; k: keys ``(m, d)``; v: values ``(m, dv)``; leading axes (the same
        for all three) are a batch, e.g. heads.
      causal: query ``i`` attends to keys ``j ≤ i`` only (needs ``n == m``).
      block_size: static number of query rows per block (a memory/time trade-off).

    Returns:
      ``(n, dv)`` (with the leading axes), in the common dtype of ``q``, ``k``, ``v``.

    Raises:
      TypeError / ValueError: non-floating or mis-shaped arrays, ``causal`` with ``n ≠ m``, a
        ``block_size`` that is not a positive integer.
    """
    q, k, v = (arguments.float_array(x, name, min_ndim=2) for x, name in ((q, "q"), (k, "k"),
                                                                          (v, "v")))
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]) or q.shape[-1] != k.shape[-1] \
            or k.shape[-2] != v.shape[-2] or 0 in q.shape[-2:] + k.shape[-2:]:
        raise ValueError(f"attention: expected q (..., n, d), k (..., m, d), v (..., m, dv) "
                         f"with the same leading axes and n, m, d ≥ 1; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"attention: causal must be True or False, got {causal!r}")
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"attention: causal=True needs as many queries as keys (n == m), got "
                         f"q {q.shape} (n={q.shape[-2]}) and k {k.shape} (m={k.shape[-2]})")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
            or block_size < 1:
        raise ValueError(f"attention: block_size must be a positive integer, got {block_size!r}")
    return apply(_attention, *arguments.promote(q, k, v), causal=bool(causal),
                 block_size=int(block_size))


def _attention_examples(rng):
    """Square (causal is verified too) at two shapes; a leading axis of heads in the second."""
    return [(normal(rng, 6, 4), normal(rng, 6, 4), normal(rng, 6, 3)),
            (normal(rng, 2, 5, 8), normal(rng, 2, 5, 8), normal(rng, 2, 5, 8))]


declare(attention, core=_attention, num_arrays=3, reference=reference.attention,
        examples=_attention_examples, hyper=({}, {"causal": True, "block_size": 2}),
        family="attention", section="attention",
        shapes="`q (n, d)`, `k (m, d)`, `v (m, dv)` → `(n, dv)`",
        backward="`Pᵀ Ō`; `P ⊙ (Ō vᵀ − δ)` k/√d, ᵀq/√d; O(n·d) memory",
        tangent="`(P ⊙ Ṡ) v − rowsum(P ⊙ Ṡ) O + P v̇`")


# --- multi-head attention: MM_o(heads(attention(MM_q x, MM_k x, MM_v x))) -------------------
def multi_head_attention_init(key, d_model, num_heads, dtype=jnp.float32):
    """Parameters ``{"q", "k", "v", "o"}``, each an MM ``{"W": (d_model, d_model), "b"}``
    with ``W ~ N(0, 1/d_model)`` and ``b = 0``, except that the keys' MM has no bias: a bias
    on the keys adds ``⟨q_i, b⟩`` to every score of row ``i``, which softmax ignores (its
    gradient is exactly zero, and an optimiser like Adam would turn its round-off into steps).

    Raises:
      ValueError: ``d_model`` is not divisible by ``num_heads``.
    """
    _heads(d_model, num_heads)
    keys = jax.random.split(key, 4)
    params = {name: {"W": jax.random.normal(kk, (d_model, d_model), dtype) / math.sqrt(d_model),
                     "b": jnp.zeros((d_model,), dtype)} for name, kk in zip("qkvo", keys)}
    del params["k"]["b"]
    return params


def _heads(d_model, num_heads):
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) \
            or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    if d_model % num_heads:
        raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    return d_model // num_heads


def multi_head_attention(params, x, num_heads, causal=False):
    """Multi-head self-attention of one sequence ``x (n, d_model)``.

    ``q, k, v = MM_q(x), MM_k(x), MM_v(x)`` (row by row), each split into ``num_heads`` heads
    of width ``d_model/num_heads``; ``attention`` on every head at once (the heads are a
    leading axis); the heads concatenated and ``MM_o`` applied. The backward is composed of
    the MMs' and attention's hand-written rules (the reshapes are JAX's).

    Args:
      params: from ``multi_head_attention_init``.
      x: ``(n, d_model)``; leading axes are a batch.
      num_heads: static, divides ``d_model``.
      causal: the causal mask of ``attention``.

    Raises:
      ValueError: ``d_model`` not divisible by ``num_heads``, wrong parameter shapes.
    """
    x = arguments.float_array(x, "x", min_ndim=2)
    width = _heads(x.shape[-1], num_heads)
    if not isinstance(params, dict) or set(params) != set("qkvo"):
        raise ValueError(f"multi_head_attention: params must be a dict with keys 'q', 'k', "
                         f"'v', 'o' (multi_head_attention_init), got "
                         f"{sorted(params) if isinstance(params, dict) else type(params).__name__}")

    def split(u):                                     # (..., n, d_model) -> (..., h, n, width)
        return jnp.swapaxes(u.reshape(*u.shape[:-1], num_heads, width), -3, -2)
    q, k, v = (split(mm(params[name], x)) for name in "qkv")
    o = jnp.swapaxes(attention(q, k, v, causal=causal), -3, -2)
    return mm(params["o"], o.reshape(*o.shape[:-2], -1))


def _mha_example(rng, d_model, n):
    params = {name: {"W": normal(rng, d_model, d_model, scale=d_model ** -0.5),
                     "b": normal(rng, d_model, scale=0.1)} for name in "qkvo"}
    del params["k"]["b"]                              # as multi_head_attention_init
    return params, normal(rng, n, d_model)


declare(multi_head_attention, num_arrays=2, reference=reference.multi_head_attention,
        examples=lambda rng: [_mha_example(rng, 4, 5), _mha_example(rng, 6, 3)],
        hyper=({"num_heads": 2, "causal": True},),
        family="attention", section="multi-head-attention", uses=(mm.core, attention.core),
        shapes="`{\"q\", \"k\", \"v\", \"o\"}` (`multi_head_attention_init`), `x (n, d_model)`",
        backward="composed: MMs and attention", tangent="composed")

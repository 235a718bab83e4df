"""Token embedding and a decoder-only Transformer; derivations in docs/transformer.md.

* ``embedding``: ``u = E[ids]`` (row lookup). ``B[emb, E](v)`` adds each ``v`` row into the row
  of ``E`` it came from (a scatter-add: repeated ids accumulate); the integer ``ids`` get no
  cotangent. The JVP is ``Ė[ids]``. Residual: ``ids`` (and a reference to ``E`` for its shape).
* ``transformer``: token plus position embeddings, ``depth`` pre-LN blocks
  ``x + MHA(LN(x))``, ``x + MM(GELU(MM(LN(x))))`` in ``lax.scan`` (compiled once, flat in
  depth), a final LN and an MM to the logits. Its backward and JVP are composed of the
  modules' hand-written rules.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop import reference
from jbackprop.modules import arguments
from jbackprop.modules.activations import gelu
from jbackprop.modules.attention import (_heads, attention, multi_head_attention,
                                         multi_head_attention_init)
from jbackprop.modules.linear import mm
from jbackprop.modules.normalisation import layer_norm
from jbackprop.modules.registry import declare, normal
from jbackprop.modules.rules import custom_rules
from jbackprop.modules.wiring import apply, sharded_like

# The public modules, re-exported by jbackprop.
__all__ = ["embedding", "transformer_init", "transformer"]


# --- embedding: u = E[ids] -------------------------------------------------------------------
def _rows(E, ids):
    """``E[ids]``; an id outside ``0..vocab−1`` (possible only when traced) gives a NaN row."""
    vocab = E.shape[0]
    safe = jnp.where((ids >= 0) & (ids < vocab), ids, vocab)         # vocab: out of bounds
    return E.at[safe].get(mode="fill", fill_value=jnp.nan, **sharded_like(ids, trailing=1))


@functools.partial(custom_rules, batch_argnums=(1,))
def _embedding(params, ids):
    return _rows(params["E"], ids)


def _embedding_fwd(params, ids):
    return _embedding(params, ids), (params["E"], ids)   # residuals: ids (and E, an input)


def _embedding_bwd(res, v):
    E, ids = res                                       # B[emb, E](v): row ids[i] += v[i]
    E_bar = jnp.zeros_like(E).at[ids].add(v.astype(E.dtype), mode="drop", **sharded_like(E))
    return {"E": E_bar}, None                          # None: the integer ids


def _embedding_jvp(res, params_dot, ids_dot):
    _, ids = res
    return _rows(params_dot["E"], ids)                 # u̇ = Ė[ids]


_embedding.defrules(_embedding_fwd, _embedding_bwd, _embedding_jvp)


def embedding(params, ids):
    r"""Token embedding ``u = E[ids]``: one row of ``E`` per id.

    .. math::
        B[\mathrm{emb}, E](v) = \textstyle\sum_i e_{\mathrm{ids}_i} v_i^\top \ \text{(scatter-add)},
        \qquad \dot u = \dot E[\mathrm{ids}].

    Residual: ``ids`` (``E`` is referenced for its shape, not copied). ``ids`` get no
    cotangent (``None``).

    Args:
      params: ``{"E": (vocab, d)}``.
      ids: integer array of any shape, values in ``0..vocab−1``.

    Returns:
      ``(*ids.shape, d)``. Under ``jax.jit`` an id out of range gives a NaN row (and adds
      nothing to ``E``'s gradient) rather than another token's row.

    Raises:
      TypeError: ``ids`` not integer, ``E`` not floating. ValueError: ``E`` not 2-D, or
        concrete ``ids`` out of range.
    """
    p = arguments.params_dict(params, "params", ("E",))
    arguments.ndim(p["E"], "params['E']", 2)
    ids = arguments.labels(ids, "ids", p["E"].shape[0])
    return apply(_embedding, p, ids)


declare(embedding, core=_embedding, num_arrays=2, reference=reference.embedding,
        examples=lambda rng: [({"E": normal(rng, 7, 4)}, np.array([1, 3, 3, 0, 6])),
                              ({"E": normal(rng, 5, 3)}, np.array([[4, 0, 4], [2, 2, 1]]))],
        family="transformer", section="embedding", shapes="`{\"E\": (vocab, d)}`, integer `ids`",
        backward="`E`: scatter-add of `v` rows at `ids`; `ids`: none", tangent="`Ė[ids]`")


# --- the Transformer ---------------------------------------------------------------------------
def transformer_init(key, vocab, d_model, num_heads, depth, max_len, dtype=jnp.float32):
    """Parameters of a decoder-only Transformer (pre-LN, GELU MLP of width ``4 d_model``).

    ``{"embed": {"E": (vocab, d)}, "pos": {"E": (max_len, d)}, "blocks": {...}, "final":
    LN, "head": MM (vocab, d), "heads": (num_heads, 0)}``. Each leaf of ``"blocks"`` has a
    leading ``depth`` axis (for ``lax.scan``). ``"heads"`` holds the number of heads as the
    shape of a zero-byte array, so that ``transformer(params, ids)`` needs nothing else; its
    gradient is empty.

    Raises:
      ValueError: ``d_model`` not divisible by ``num_heads``, sizes not positive.
    """
    _heads(d_model, num_heads)
    for name, value in (("vocab", vocab), ("depth", depth), ("max_len", max_len)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"transformer_init: {name} must be a positive integer, got {value!r}")
    k_embed, k_pos, k_head, k_blocks = jax.random.split(key, 4)

    def ln():
        return {"beta": jnp.zeros((d_model,), dtype), "gamma": jnp.ones((d_model,), dtype)}

    def dense(k, n, m, scale):
        return {"W": scale * jax.random.normal(k, (n, m), dtype) / math.sqrt(m),
                "b": jnp.zeros((n,), dtype)}

    def block(k):
        k_attn, k1, k2 = jax.random.split(k, 3)
        attn = multi_head_attention_init(k_attn, d_model, num_heads, dtype)
        attn["o"]["W"] = attn["o"]["W"] / math.sqrt(2 * depth)   # residual branches start small
        return {"ln1": ln(), "attn": attn, "ln2": ln(),
                "mlp1": dense(k1, 4 * d_model, d_model, 1.0),
                "mlp2": dense(k2, d_model, 4 * d_model, 1 / math.sqrt(2 * depth))}
    blocks = jax.vmap(block)(jax.random.split(k_blocks, depth))
    return {"embed": {"E": 0.1 * jax.random.normal(k_embed, (vocab, d_model), dtype)},
            "pos": {"E": 0.1 * jax.random.normal(k_pos, (max_len, d_model), dtype)},
            "blocks": blocks, "final": ln(), "head": dense(k_head, vocab, d_model, 1.0),
            "heads": jnp.zeros((num_heads, 0), dtype)}


def _block(x, p, num_heads, causal):
    """One pre-LN block: ``x + MHA(LN1(x))``, then ``x + MM2(GELU(MM1(LN2(x))))``."""
    x = x + multi_head_attention(p["attn"], layer_norm(p["ln1"], x), num_heads, causal)
    return x + mm(p["mlp2"], gelu(mm(p["mlp1"], layer_norm(p["ln2"], x))))


def transformer(params, ids, causal=True):
    """A decoder-only Transformer on one sequence: ``ids (n,)`` → logits ``(n, vocab)``.

    ``x = E[ids] + P[0..n−1]``; ``depth`` blocks (``lax.scan`` over the stacked parameters);
    ``MM_head(LN(x))``. Every part runs its hand-written rules; JAX chains them.

    Args:
      params: from ``transformer_init``.
      ids: integer ``(n,)`` with ``n ≤ max_len``; leading axes are a batch.
      causal: position ``i`` sees positions ``≤ i`` (a language model); ``False``: all.

    Raises:
      ValueError / TypeError: ``n > max_len``, bad ids (as ``embedding``), bad ``params``.
    """
    if not isinstance(params, dict) or not {"embed", "pos", "blocks", "final", "head",
                                            "heads"} <= set(params):
        raise ValueError("transformer: params must come from transformer_init (keys 'embed', "
                         "'pos', 'blocks', 'final', 'head', 'heads')")
    ids = arguments.labels(ids, "ids", params["embed"]["E"].shape[0])
    n, max_len = ids.shape[-1] if ids.ndim else 0, params["pos"]["E"].shape[0]
    if ids.ndim < 1 or not 1 <= n <= max_len:
        raise ValueError(f"transformer: ids must have shape (..., n) with 1 ≤ n ≤ max_len = "
                         f"{max_len}, got {ids.shape}")
    num_heads = params["heads"].shape[0]
    x = embedding(params["embed"], ids) + embedding(params["pos"], jnp.arange(n))
    x, _ = jax.lax.scan(lambda x, p: (_block(x, p, num_heads, causal), None), x,
                        params["blocks"])
    return mm(params["head"], layer_norm(params["final"], x))


def _transformer_reference(params, ids, causal=True):
    return reference.transformer(params, ids, causal)


def _transformer_example(rng, vocab, d_model, heads, depth, n):
    params = transformer_init(jax.random.PRNGKey(int(rng.integers(1 << 30))), vocab, d_model,
                              heads, depth, n)            # float32, then float64 NumPy:
    params = jax.tree.map(lambda a: np.asarray(a, np.float64) + 0.1 * rng.standard_normal(a.shape),
                          params)
    return params, rng.integers(0, vocab, n)


declare(transformer, reference=_transformer_reference,
        examples=lambda rng: [_transformer_example(rng, 5, 4, 2, 2, 4),
                              _transformer_example(rng, 4, 4, 1, 1, 3)],
        family="transformer", section="transformer",
        uses=(mm.core, attention.core, layer_norm.core, gelu.core, embedding.core),
        shapes="`transformer_init(key, vocab, d_model, num_heads, depth, max_len)`, `ids (n,)`",
        backward="composed; blocks in `lax.scan`", tangent="composed, in `lax.scan`",
        kinks="none (GELU, softmax, LN are smooth)")

"""Running a rule on blocks of rows: the memory trick of attention and the fused loss.

A rule whose temporaries are (rows × something large) — attention's (n × m) scores, the fused
loss's (N × vocabulary) logits — runs on blocks of ``block`` rows instead (zero-padded to a
whole number of blocks): the largest temporaries are then (block × something large). Row-wise
outputs are put back together; a parameter's cotangent is summed over the blocks in a
``lax.scan``. Kept apart from the calculus: the rules say what one block computes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["by_row_blocks"]


def by_row_blocks(block_fn, block, n, per_row, shared, sum_outputs=0):
    """``block_fn(*row_blocks, rows, *shared)`` over the blocks of the ``(..., n, ·)`` arrays
    ``per_row``; returns its outputs: the first ``len(outputs) − sum_outputs`` put back
    together row-wise, the last ``sum_outputs`` (pytrees) summed over the blocks."""
    if n <= block:                                    # one block: no loop at all
        return block_fn(*per_row, jnp.arange(n), *shared)
    count = -(-n // block)

    def split(x):                                     # (..., n, c) -> (count, ..., block, c)
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, count * block - n), (0, 0)])
        return jnp.moveaxis(x.reshape(*x.shape[:-2], count, block, x.shape[-1]), -3, 0)

    def join(x):                                      # the inverse, cut back to n rows
        x = jnp.moveaxis(x, 0, -3)
        return x.reshape(*x.shape[:-3], count * block, x.shape[-1])[..., :n, :]

    xs = ([split(x) for x in per_row], jnp.arange(count * block).reshape(count, block))
    if not sum_outputs:
        return tuple(map(join, jax.lax.map(lambda a: block_fn(*a[0], a[1], *shared), xs)))
    # the first block starts the sums (typed as the blocks make them, also inside shard_map)
    first = block_fn(*jax.tree.map(lambda x: x[0], xs)[0], xs[1][0], *shared)

    def step(acc, a):
        outs = block_fn(*a[0], a[1], *shared)
        return jax.tree.map(jnp.add, acc, list(outs[-sum_outputs:])), outs[:-sum_outputs]
    acc, rows = jax.lax.scan(step, list(first[-sum_outputs:]), jax.tree.map(lambda x: x[1:], xs))
    rows = [jnp.concatenate([f[None], r]) for f, r in zip(first[:-sum_outputs], rows)]
    return (*map(join, rows), *acc)

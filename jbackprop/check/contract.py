"""Checks of a VJP's contract with JAX that need no numerics: what ``verify_vjp`` runs before
comparing any value.

* ``cotangent_contract``: every cotangent has exactly its primal's shape and dtype (and, with a
  reference, the reference's). A backward that is right in value but returns float64 for a
  float32 input passes every numerical check, yet ``jax.grad`` then returns float64 and a
  ``lax.scan`` over the parameters breaks.
* ``determinism``: two runs of the backward on the same inputs agree bit for bit. A backward
  that draws Python randomness, or reads state that changes between calls, can be right to
  every tolerance and still make two training runs from one seed differ.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jbackprop.check.report import Check

CONTRACT = "contract (cotangent shapes and dtypes)"
DETERMINISM = "determinism (two runs bit for bit)"


def _describe(x) -> str:
    return f"{tuple(jnp.shape(x))} {jnp.result_type(x)}"


def cotangent_contract(labels: Sequence[str], primals: Sequence, cotangents: Sequence,
                       expected: Sequence | None = None) -> Check:
    """A ``Check`` that fails (error ``inf``) naming every leaf whose cotangent's shape or dtype
    differs from its primal's (or from ``expected``, the reference's cotangents)."""
    wrong = []
    for i, (label, x, c) in enumerate(zip(labels, primals, cotangents)):
        want = [_describe(x)] + ([_describe(expected[i])] if expected is not None else [])
        if any(_describe(c) != w for w in want):
            wrong.append(f"{label}: cotangent {_describe(c)}, primal {_describe(x)}"
                         + (f", reference {want[1]}" if expected is not None else ""))
    if len(cotangents) != len(primals):
        wrong.append(f"{len(cotangents)} cotangents for {len(primals)} differentiable leaves")
    return Check(CONTRACT, float("inf") if wrong else 0.0, 0.0, "; ".join(wrong))


def determinism(labels: Sequence[str], first: Sequence, second: Sequence) -> Check:
    """A ``Check`` that fails naming every leaf whose cotangent differs, in any bit, between two
    runs of the backward on the same inputs and ``v`` (NaN equal to NaN)."""
    differ = [label for label, a, b in zip(labels, first, second)
              if not np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)]
    return Check(DETERMINISM, float("inf") if differ else 0.0, 0.0,
                 f"differs between two runs: {', '.join(differ)}" if differ else "")

"""Checks of a VJP's contract with JAX that need no numerics: what ``verify_vjp`` runs before
comparing any value.

* ``cotangent_contract``: every cotangent has exactly its primal's shape and dtype (and, with a
  reference, the reference's). A backward that is right in value but returns float64 for a
  float32 input passes every numerical check, yet ``jax.grad`` then returns float64 and a
  ``lax.scan`` over the parameters breaks.
* ``integer_leaves``: integer and bool leaves are never dropped silently: each is listed in the
  report, and its cotangent must be a ``float0`` zero (or ``None``, as JAX accepts), while the
  floating leaves of the same argument are checked as usual.
* ``determinism``: two runs of the backward on the same inputs agree bit for bit. A backward
  that draws Python randomness, or reads state that changes between calls, can be right to
  every tolerance and still make two training runs from one seed differ.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop.check.report import Check, Leaf

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
    return Check(CONTRACT, float("inf") if wrong else 0.0, 0.0, "; ".join(wrong), key="contract")


def determinism(labels: Sequence[str], first: Sequence, second: Sequence) -> Check:
    """A ``Check`` that fails naming every leaf whose cotangent differs, in any bit, between two
    runs of the backward on the same inputs and ``v`` (NaN equal to NaN)."""
    differ = [label for label, a, b in zip(labels, first, second)
              if not np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)]
    return Check(DETERMINISM, float("inf") if differ else 0.0, 0.0,
                 f"differs between two runs: {', '.join(differ)}" if differ else "", key="determinism")


INTEGERS = "integer leaves (float0 cotangents)"


def integer_leaves(p, v, rows: list[Leaf]) -> Check:
    """Append a report row for every integer or bool leaf of the differentiated arguments of
    ``p`` (the engine's problem) and check its cotangent: ``float0`` zeros from ``jax.vjp``, or
    ``None``/``float0``/zeros from a notes-form ``backward``."""
    ints = [k for k in range(len(p.all_leaves)) if k not in p.float_pos]
    if not ints:
        return Check(INTEGERS, 0.0, 0.0, "no integer or bool leaves", skipped=True,
                     key="integer_leaves")
    if p.backward is None:
        def f(*all_leaves):
            return p.fn(*p.full_args([all_leaves[k] for k in p.float_pos], all_leaves))
        cts = list(jax.vjp(f, *p.all_leaves)[1](v))
    else:
        cts = p.notes_cotangents(p.leaves, v)
    wrong = []
    for k in ints:
        x, c = p.all_leaves[k], cts[k]
        ok = c is None or (jnp.shape(c) == jnp.shape(x) and (
            jnp.result_type(c) == jax.dtypes.float0 or not np.any(np.asarray(c))))
        what = "None" if c is None else _describe(c)
        rows.append(Leaf(p.all_labels[k], tuple(jnp.shape(x)), str(jnp.result_type(x)),
                         note=f"{jnp.result_type(x)}: not differentiated, cotangent {what}"
                         if ok else f"integer leaf given cotangent {what}: must be float0 zeros or None",
                         ok=ok))
        if not ok:
            wrong.append(f"{p.all_labels[k]}: cotangent {what}")
    note = "; ".join(wrong) if wrong else \
        f"{len(ints)} not differentiated: " + ", ".join(p.all_labels[k] for k in ints)
    return Check(INTEGERS, float("inf") if wrong else 0.0, 0.0, note, key="integer_leaves")

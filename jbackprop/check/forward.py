"""Prove a hand-written JVP right: ``verify_jvp``, the forward-mode twin of ``verify_vjp``.

For a function whose JVP is hand-written (a ``jb.custom_rules`` function, any module or model
of jbackprop, or the notes-form ``tangent(*args, *dots)`` such as ``jb.tangent(jb.mm)``), for
a random tangent ``ż`` (per element ``N(0, 1) · max(1, |x|)``, so that it moves every input on
its own scale) the report has one row per *output* leaf:

1. **autodiff**: ``J ż`` against ``jax.jvp`` of the pure ``reference``, in float64;
2. **finite differences**: ``(f(x + h ż) − f(x − h ż)) / 2h`` per output element, in float64,
   at the step where it is most accurate (the ladder of ``jbackprop.check.differences``;
   kinks found from behaviour and left out);

and whole-function checks, each with a ``key``:

* ``adjoint_identity``: the two hand-written rules against each other,
  ``⟨J ż, v⟩ = ⟨ż, Jᵀ v⟩`` to float64 round-off — no reference, no finite differences: a JVP and
  a backward that disagree cannot both be right;
* ``contract``: the tangent has the output's shapes and dtypes; ``primal``: ``jax.jvp``'s
  primal output is the function's; ``linearity`` in ``ż``; ``jit``; ``vmap`` (a batch of
  tangents, as ``jax.jacfwd`` makes, and a batch of inputs with their tangents).

Every comparison is per element against ``|e_i| + scale_i`` (``arrays.compare``; the local
scale of each output element, ``differences.local_scale``), as in ``verify_vjp``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop._compat import enable_x64
from jbackprop.check import differences as fd
from jbackprop.check.arrays import compare, is_float, normal, to64
from jbackprop.check.differences import FD_TOL
from jbackprop.check.engine import TOLERANCES, _Problem, _rules
from jbackprop.check.report import Check, Leaf, Report
from jbackprop.check.whole import guard

JVP_CHECKS = ("contract", "primal", "autodiff", "finite_differences", "adjoint_identity",
              "linearity", "jit", "vmap")
ADJOINT_TOL = 1e-12       # float64: ⟨J ż, v⟩ − ⟨ż, Jᵀ v⟩ relative to the sum of |terms|


def verify_jvp(fn: Callable, *args: Any, reference: Callable | None = None,
               tangent: Callable | None = None, argnums: Sequence[int] | None = None,
               name: str | None = None, rtol: float | None = None,
               checks: Sequence[str] = JVP_CHECKS, seed: int = 0) -> Report:
    """Verify the hand-written JVP of ``fn`` at ``args`` and return a ``Report``.

    Args:
      fn: the forward; its JVP is ``jax.jvp(fn, ...)`` (a ``custom_rules`` rule), unless
        ``tangent`` is given.
      *args: the inputs (pytrees; integer and bool leaves get no tangent).
      reference: a pure forward of the same mathematics, differentiated by JAX itself.
      tangent: ``tangent(*args, *dots) -> out_dot``, one tangent per argument (the notes' form,
        e.g. ``jb.tangent(jb.mm)``), to check instead of ``jax.jvp(fn)``.
      argnums: the arguments with a tangent (default: every argument with a floating leaf).
      name, rtol, seed: as for ``verify_vjp``.
      checks: a subset of ``JVP_CHECKS``.
    """
    unknown = set(checks) - set(JVP_CHECKS)
    if unknown:
        raise ValueError(f"verify_jvp: unknown checks {sorted(unknown)}; choose from {JVP_CHECKS}")
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args) if any(is_float(x) for x in jax.tree.leaves(a)))
    prob = _Problem(fn, tuple(args), tuple(argnums), reference, None, seed)
    if not prob.leaves:
        raise ValueError(f"verify_jvp: arguments {tuple(argnums)} have no floating-point leaf")
    tol = rtol if rtol is not None else TOLERANCES.get(prob.dtype, 1e-4)
    dots = _direction(prob, 0)
    _, out_dot = _jvp(prob, tangent, prob.leaves, dots, eager=True)   # the jit check compares
    out_dot = jax.tree.leaves(out_dot)
    labels = ["out" + jax.tree_util.keystr(k) for k, _ in
              jax.tree_util.tree_flatten_with_path(prob.out)[0]]
    rows = [Leaf(lab, tuple(o.shape), str(o.dtype)) for lab, o in zip(labels, jax.tree.leaves(prob.out))]
    with enable_x64(True):
        p64, dots64 = prob.in_float64(), to64(dots)
        use_ref = reference is not None
        scale = fd.local_scale(lambda l, d: jax.tree.leaves(_jvp(p64, None, l, d, use_ref)[1]),
                               p64.leaves, dots64, seed)
        out_scale = fd.local_scale(lambda l, d: jax.tree.leaves(p64.call_compiled(l, use_ref)),
                                   p64.leaves, dots64, seed) if "primal" in checks else None
        if use_ref and "autodiff" in checks:
            truth = jax.tree.leaves(_jvp(p64, None, p64.leaves, dots64, True)[1])
            for row, a, e, s in zip(rows, out_dot, truth, scale):
                row.autodiff = compare(a, e, tol, s)
        if "finite_differences" in checks:
            for row, c in zip(rows, _finite_differences(p64, dots64, out_dot, scale, max(FD_TOL, tol))):
                row.finite_differences = c
        report_checks = []
        if "adjoint_identity" in checks:
            report_checks.append(guard("adjoint_identity", "adjoint identity ⟨J ż, v⟩ = ⟨ż, Jᵀ v⟩",
                                       ADJOINT_TOL, lambda: _adjoint_identity(p64, tangent, dots64)))
        if "linearity" in checks:
            report_checks.append(guard("linearity", "linearity in ż", 10 * max(FD_TOL, tol),
                                       lambda: _linearity(p64, tangent, scale)))
    run = {
        "contract": lambda: guard("contract", "contract (tangent shapes and dtypes)", 0.0,
                                  lambda: _contract(prob, out_dot)),
        "primal": lambda: guard("primal", "primal (jax.jvp's output = the function's)", tol,
                                lambda: _worst(jax.tree.leaves(_jvp(prob, tangent, prob.leaves, dots)[0]),
                                               jax.tree.leaves(prob.call(prob.leaves)), tol,
                                               out_scale)),
        "jit": lambda: guard("jit", "jit", 10 * tol, lambda: _worst(jax.tree.leaves(jax.jit(
            lambda l, d: _jvp(prob, tangent, l, d)[1])(prob.leaves, dots)), out_dot, tol, scale)),
        "vmap": lambda: guard("vmap", "vmap (tangents; inputs with tangents)", 10 * tol,
                              lambda: _vmap(prob, tangent, tol, scale)),
    }
    report_checks += [run[k]() for k in run if k in checks]
    return Report((name or getattr(fn, "__name__", "fn")) + " (JVP)", prob.dtype, rows,
                  report_checks, mode="JVP")


def _direction(p: _Problem, k: int) -> list:
    """A tangent per floating leaf: ``N(0, 1) · max(1, |x|)`` (in the leaf's dtype)."""
    return [jnp.asarray(np.asarray(normal(p.seed, 700 + 10 * k + j, x.shape, jnp.float64))
                        * np.maximum(1.0, np.abs(np.asarray(x, np.float64))), x.dtype)
            for j, x in enumerate(p.leaves)]


def _jvp(p: _Problem, tangent, leaves, dots, use_reference=False, eager=False):
    """``(out, J ż)``: the hand-written JVP (or the reference's, by autodiff); compiled once
    per function and shapes unless ``eager``."""
    if eager:
        return _jvp_eager(p.fn, p.reference, tangent, p.argnums, use_reference, p.args,
                          list(leaves), list(dots))
    return _jvp_jit(p.fn, p.reference, tangent, p.argnums, bool(use_reference), _rules(p.fn),
                    p.args, list(leaves), list(dots))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _jvp_jit(fn, reference, tangent, argnums, use_reference, rules, args, leaves, dots):
    del rules                                             # in the cache key only
    return _jvp_eager(fn, reference, tangent, argnums, use_reference, args, leaves, dots)


def _jvp_eager(fn, reference, tangent, argnums, use_reference, args, leaves, dots):
    p = _Problem(fn, args, argnums, reference, None, 0)
    if tangent is not None and not use_reference:         # the notes' form: a tangent per arg
        full = p.full_args(leaves)
        with_dots = p.full_args(dots)
        tangents = [d if i in argnums else jax.tree.map(jnp.zeros_like, a)
                    for i, (a, d) in enumerate(zip(full, with_dots))]
        return fn(*full), tangent(*full, *tangents)
    return jax.jvp(lambda *l: p.call(list(l), use_reference), tuple(leaves), tuple(dots))


def _worst(actual, expected, tol, scale=None) -> float:
    scale = scale if scale is not None else [None] * len(expected)
    return max([compare(a, e, tol, s).error for a, e, s in zip(actual, expected, scale)],
               default=0.0)


def _contract(p: _Problem, out_dot) -> tuple[float, str]:
    bad = [f"{o.shape} {o.dtype} -> tangent {jnp.shape(t)} {jnp.result_type(t)}"
           for o, t in zip(jax.tree.leaves(p.out), out_dot)
           if jnp.shape(t) != o.shape or jnp.result_type(t) != o.dtype]
    return (float(len(bad)), "; ".join(bad)) if bad else (0.0, "")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _steps_jit(fn, argnums, args, leaves, dots, steps):
    p = _Problem(fn, args, argnums, None, None, 0)
    return jax.vmap(lambda s: p.call([x + s * d for x, d in zip(leaves, dots)]))(steps)


def _finite_differences(p64: _Problem, dots64, out_dot, scale, tol) -> list:
    """Central differences along ``ż`` per output element, each at its best step."""
    h0 = fd.EPS64 ** (1 / 3)
    steps = jnp.asarray(fd.ladder_and_probe() * h0)
    outs = jax.tree.leaves(_steps_jit(p64.fn, p64.argnums, p64.args, list(p64.leaves),
                                      list(dots64), steps))
    base = jax.tree.leaves(p64.call_compiled(p64.leaves))
    rows = []
    for o, b, a, s in zip(outs, base, out_dot, scale):
        o, b = np.asarray(o, np.float64).reshape(len(steps), -1), np.asarray(b, np.float64).reshape(-1)
        moved = np.any(o != b, axis=0)
        dJ = (o - b)[:-1]                                  # the ladder (the probe is last)
        R = np.where(moved, np.abs(o) + np.abs(b), 0.0)[:-1]
        still = np.where(moved, 0.0, np.abs(b))
        value, noise, kink, _ = fd.central_differences(dJ, R, np.full(b.size, h0), still)
        shape = np.shape(a)
        c = compare(np.where(kink, 0.0, np.asarray(a, np.float64).reshape(-1)).reshape(shape),
                    np.where(kink, 0.0, value).reshape(shape), tol, s, noise.reshape(shape))
        if kink.any():
            c.note = f"{int(kink.sum())} kink(s) left out"
        rows.append(c)
    return rows


def _adjoint_identity(p64: _Problem, tangent, dots64) -> tuple[float, str]:
    """``⟨J ż, v⟩`` by the hand-written JVP against ``⟨ż, Jᵀ v⟩`` by the hand-written VJP."""
    _, out_dot = _jvp(p64, tangent, p64.leaves, dots64)
    v = p64.cotangent(7)
    bars = p64.pullback(p64.leaves, v)
    terms_jvp = [np.asarray(a, np.float64) * np.asarray(b, np.float64)
                 for a, b in zip(jax.tree.leaves(out_dot), jax.tree.leaves(v))]
    terms_vjp = [np.asarray(a, np.float64) * np.asarray(b, np.float64) for a, b in zip(dots64, bars)]
    lhs, rhs = sum(t.sum() for t in terms_jvp), sum(t.sum() for t in terms_vjp)
    size = sum(np.abs(t).sum() for t in terms_jvp + terms_vjp)
    return abs(lhs - rhs) / max(size, fd.EPS64), f"⟨J ż, v⟩ = {lhs:.17g}, ⟨ż, Jᵀ v⟩ = {rhs:.17g}"


def _linearity(p64: _Problem, tangent, scale) -> float:
    d1, d2 = _direction(p64, 1), _direction(p64, 2)
    combined = _jvp(p64, tangent, p64.leaves, [2 * a - 3 * b for a, b in zip(d1, d2)])[1]
    j1, j2 = (jax.tree.leaves(_jvp(p64, tangent, p64.leaves, d)[1]) for d in (d1, d2))
    expected = [2 * a - 3 * b for a, b in zip(j1, j2)]
    return _worst(jax.tree.leaves(combined), expected, 0.0,
                  [5 * s + 1e-13 * np.abs(e) for s, e in zip(scale, expected)])


def _vmap(p: _Problem, tangent, tol, scale) -> float:
    """A batch of three tangents (``jax.jacfwd``'s vmap), then three inputs with their tangents,
    against one call each."""
    batch = [_direction(p, 3 + k) for k in range(3)]
    stacked = [jnp.stack(x) for x in zip(*batch)]
    one = lambda l, d: jax.tree.leaves(_jvp(p, tangent, l, d)[1])
    by_tangent = jax.vmap(lambda d: one(p.leaves, d))(stacked)
    inputs = [[x * (1 + 0.1 * k) for x in p.leaves] for k in range(3)]
    by_input = jax.vmap(one)([jnp.stack(x) for x in zip(*inputs)], stacked)
    errors = []
    for k in range(3):
        errors.append(_worst([b[k] for b in by_tangent], one(p.leaves, batch[k]), tol, scale))
        errors.append(_worst([b[k] for b in by_input], one(inputs[k], batch[k]), tol, scale))
    return max(errors)

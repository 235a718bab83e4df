"""Prove a hand-written VJP right: ``verify_vjp`` checks it against independent evidence.

For a function ``fn`` with a hand-written VJP (any ``jax.custom_vjp`` function, or any function
plus a separate ``backward(*args, v)``), ``verify_vjp`` returns a ``Report`` (see
``jbackprop.check.report``) with first the **contract** — every cotangent has exactly its
primal's shape and dtype, and the reference's (``jbackprop.check.contract``) — then, per input
leaf and for random cotangents ``v``:

1. **autodiff**: the VJP against ``jax.vjp`` of a pure ``reference`` forward (if given);
2. **finite differences**: central differences in float64, step ``ε^{1/3} · max(1, |x|)``
   (per element for small leaves, along random directions otherwise); points where the
   one-sided differences disagree (kinks, e.g. ReLU at 0) are reported and left out;
3. **Taylor**: ``|J(x+hδ) − J(x)|`` must shrink at rate 1 and
   ``|J(x+hδ) − J(x) − h⟨∇J, δ⟩|`` at rate 2 (``J = ⟨v, fn(x)⟩``, float64); remainders at the
   round-off floor are left out, and all at the floor means ``J`` is linear along ``δ``;

and for the whole function: the **adjoint** (dot-product) test ``⟨J t, v⟩ = ⟨t, Jᵀ v⟩`` (``J t``
from the reference's JVP, else finite differences), **linearity** of the backward in ``v``, the
same VJP under **jit** and **vmap** (per-example gradients against a Python loop, and the
gradient of a vmapped sum), and **reverse-over-reverse** (``jax.grad`` of ``⟨w, B_x(v)⟩``
against float64 finite differences of it). The residual bytes come from ``jax.ad_checkpoint.print_saved_residuals``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop._compat import enable_x64
from jbackprop.check.arrays import all_float as _all_float, compare as _compare, inner as _inner
from jbackprop.check.arrays import is_float as _is_float, labels as _labels, normal as _normal
from jbackprop.check.arrays import to64 as _to64
from jbackprop.check.contract import cotangent_contract, determinism
from jbackprop.check.report import Check, Comparison, Leaf, Report, Taylor, saved_residuals

# Relative tolerance of a hand-written cotangent against autodiff, by the dtype it is computed in.
TOLERANCES = {"float64": 1e-9, "float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
FD_TOL = 1e-6             # float64 finite differences (their own error is ~1e-10)
ALL_CHECKS = ("contract", "determinism", "autodiff", "finite_differences", "taylor", "adjoint",
              "linearity", "jit", "vmap",
              "reverse_over_reverse")
_EPS64 = float(np.finfo(np.float64).eps)


def verify_vjp(fn: Callable, *args: Any, reference: Callable | None = None,
               backward: Callable | None = None, argnums: Sequence[int] | None = None,
               batch_argnums: Sequence[int] | None = None, name: str | None = None,
               rtol: float | None = None, checks: Sequence[str] = ALL_CHECKS,
               seed: int = 0) -> Report:
    """Verify the VJP of ``fn`` at ``args`` and return a ``Report``.

    Args:
      fn: the forward; its VJP is ``jax.vjp(fn, ...)`` (a ``custom_vjp`` rule), unless
        ``backward`` is given.
      *args: the inputs (pytrees of arrays; integer leaves are not differentiated).
      reference: a pure forward of the same mathematics, differentiated by JAX itself.
      backward: ``backward(*args, v) -> tuple`` of cotangents of every argument (the notes'
        form, e.g. ``jb.backward(jb.mm)``), to check instead of ``fn``'s own VJP.
      argnums: arguments to differentiate (default: every all-float argument).
      batch_argnums: arguments that carry the batch in the vmap check (default: all but the
        first when it is a parameter pytree (dict/list/tuple), as in ``fn(params, z)``; else
        ``argnums``).
      name: for the report (default: ``fn.__name__``).
      rtol: tolerance against autodiff (default: ``TOLERANCES`` by dtype).
      checks: a subset of ``ALL_CHECKS``.
      seed: for the random cotangents, directions and batches.
    """
    unknown = set(checks) - set(ALL_CHECKS)
    if unknown:
        raise ValueError(f"verify_vjp: unknown checks {sorted(unknown)}; choose from {ALL_CHECKS}")
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args) if _all_float(a))
    if not argnums:
        raise ValueError("verify_vjp: no floating-point argument to differentiate")
    prob = _Problem(fn, args, tuple(argnums), reference, backward, seed)
    tol = rtol if rtol is not None else TOLERANCES.get(prob.dtype, 1e-4)
    v = prob.cotangent(0)
    g = prob.pullback_eager(prob.leaves, v)    # eagerly: the jit check compares against it
    leaves = [Leaf(lab, tuple(x.shape), str(x.dtype)) for lab, x in zip(prob.labels, prob.leaves)]
    if reference is not None and "autodiff" in checks:
        for k in range(2):                         # two random cotangents; keep the worse
            vk = prob.cotangent(k)
            gk = g if k == 0 else prob.pullback(prob.leaves, vk)
            expected = prob.pullback(prob.leaves, vk, use_reference=True)
            for leaf, a, e in zip(leaves, gk, expected):
                c = _compare(a, e, tol)
                if leaf.autodiff is None or c.error > leaf.autodiff.error:
                    leaf.autodiff = c
    with enable_x64(True):  # finite differences, Taylor, adjoint and 2nd order in float64
        p64 = prob.in_float64()
        v64, g64 = _to64(v), p64.pullback(p64.leaves, _to64(v))
        kinks = []
        for i, leaf in enumerate(leaves):
            fd, kink = _finite_differences(p64, i, v64, g[i], max(FD_TOL, tol))
            kinks.append(kink)
            if "finite_differences" in checks:
                leaf.finite_differences = fd
            if "taylor" in checks:
                leaf.taylor = _taylor(p64, i, v64, g64[i], kink)
        checks64 = _float64_checks(p64, v64, g64, tol, checks, kinks)
    if batch_argnums is None:  # (params, data, …): the data carry the batch, params are shared
        first = args[argnums[0]]
        batch_argnums = argnums[1:] if len(argnums) > 1 and isinstance(first, (dict, list, tuple)) \
            else argnums
    contract = None
    if "contract" in checks:
        expected_g = prob.pullback(prob.leaves, v, use_reference=True) if reference else None
        contract = cotangent_contract(prob.labels, prob.leaves, g, expected_g)
    repeat = determinism(prob.labels, g, prob.pullback_eager(prob.leaves, v)) \
        if "determinism" in checks else None
    report_checks = [c for c in (contract, repeat, checks64.get("adjoint"), *_working_dtype_checks(
        prob, v, g, tol, checks, batch_argnums), checks64.get("reverse_over_reverse")) if c]
    nbytes, residuals = saved_residuals(lambda *l: prob.call(list(l)), prob.leaves, prob.labels) \
        if backward is None else (None, [])
    return Report(name or getattr(fn, "__name__", "fn"), prob.dtype, leaves, report_checks,
                  nbytes, residuals)


class _Problem:
    """``fn`` and its VJP as functions of the flat list of differentiable leaves."""

    def __init__(self, fn, args, argnums, reference, backward, seed):
        self.fn, self.args, self.argnums = fn, args, argnums
        self.reference, self.backward, self.seed = reference, backward, seed
        self.leaves, self.treedef = jax.tree.flatten(tuple(args[i] for i in argnums))
        self.labels = _labels(fn, args, argnums)
        self.dtype = str(jnp.result_type(*self.leaves))
        self.out = jax.eval_shape(lambda *l: self.call(list(l)), *self.leaves)

    def full_args(self, leaves, args=None):
        a = list(self.args if args is None else args)
        for i, d in zip(self.argnums, jax.tree.unflatten(self.treedef, leaves)):
            a[i] = d
        return a

    def call(self, leaves, use_reference=False):
        return (self.reference if use_reference else self.fn)(*self.full_args(leaves))

    def pullback(self, leaves, v, use_reference=False):
        """Cotangents of the differentiable leaves (jit-compiled; shared by same-shaped calls).

        A backward that cannot be compiled runs eagerly here; the jit check reports it."""
        try:
            return _pullback_jit(self.fn, self.reference, self.backward, self.argnums,
                                 bool(use_reference), _rules(self.fn), self.args, list(leaves), v)
        except Exception:  # noqa: BLE001
            return self.pullback_eager(leaves, v, use_reference)

    def J_batch(self, i, v, dxs):
        """J = ⟨v, fn(x)⟩ with leaf ``i`` shifted by each of ``dxs`` (one compiled call)."""
        return _J_batch_jit(self.fn, self.argnums, i, self.args, list(self.leaves), v, dxs)

    def pullback_eager(self, leaves, v, use_reference=False):
        """Cotangents of the differentiable leaves: the hand-written VJP, or the reference's."""
        if self.backward is not None and not use_reference:
            cts = self.backward(*self.full_args(leaves), v)
            return jax.tree.leaves(tuple(cts[i] for i in self.argnums))
        f = lambda *l: self.call(list(l), use_reference)
        return list(jax.vjp(f, *leaves)[1](v))

    def scalar(self, leaves, v):
        """J = ⟨v, fn(x)⟩."""
        return _inner(v, self.call(leaves))

    def cotangent(self, k, out=None):
        out = self.out if out is None else out
        return jax.tree.map(lambda o: _normal(self.seed, 1000 + k, o.shape, o.dtype), out)

    def in_float64(self) -> "_Problem":
        args = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if _is_float(a) else jnp.asarray(a),
                            self.args)
        return _Problem(self.fn, args, self.argnums, self.reference, self.backward, self.seed)


def _rules(fn) -> tuple:
    """The rules a VJP has now: ``fwd`` and ``bwd`` of a ``custom_vjp`` (or of a module's core).

    Part of the compiled pullback's cache key, so that a rule redefined on the same object
    (``f.defvjp(fwd, fixed_bwd)``) is seen at the next call, not the stale compilation."""
    fn = getattr(fn, "func", fn)                          # a functools.partial
    core = getattr(fn, "core", fn)
    return getattr(core, "fwd", None), getattr(core, "bwd", None)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _pullback_jit(fn, reference, backward, argnums, use_reference, rules, args, leaves, v):
    del rules                                             # in the cache key only
    return _Problem(fn, args, argnums, reference, backward, 0).pullback_eager(leaves, v, use_reference)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _J_batch_jit(fn, argnums, i, args, leaves, v, dxs):
    p = _Problem(fn, args, argnums, None, None, 0)

    def J(dx):
        shifted = list(leaves)
        shifted[i] = leaves[i] + dx
        return p.scalar(shifted, v)
    return jax.vmap(J)(dxs)


_TAYLOR_H = [1e-2 * 2.0 ** -k for k in range(16)]
_DIRECTIONS = 3


def _finite_differences(p: _Problem, i: int, v, g, tol: float):
    """Central differences ``(J(x + h s) − J(x − h s)) / 2h`` of ``J = ⟨v, fn(x)⟩`` against the
    hand-written ``g``, per element ``s = e_j`` for small leaves, else along random directions,
    with ``h = ε^{1/3} max(1, |x|)``. Points where ``J`` has a kink (ReLU at 0) or that lie
    within ``h`` of one are left out (``_kinks``). Returns the comparison and the kink mask (or
    None)."""
    x = p.leaves[i]
    if x.size <= 64:
        h = _EPS64 ** (1 / 3) * jnp.maximum(1.0, jnp.abs(x))
        steps = jnp.eye(x.size, dtype=x.dtype).reshape((x.size, *x.shape)) * h
        h = h.reshape(-1)
    else:
        hs = _EPS64 ** (1 / 3) * max(1.0, float(jnp.max(jnp.abs(x))))
        steps = jnp.stack([hs * _normal(p.seed, 50 + k, x.shape, x.dtype) for k in range(_DIRECTIONS)])
        h = jnp.full((_DIRECTIONS,), hs)
    n = len(h)
    Js = p.J_batch(i, v, jnp.concatenate([jnp.zeros_like(x)[None], steps, -steps,
                                          steps / 2, -steps / 2]))
    J0, (Jp, Jm, Jp2, Jm2) = Js[0], (Js[1 + k * n:1 + (k + 1) * n] for k in range(4))
    fd = (Jp - Jm) / (2 * h)
    kink = _kinks(J0, Jp, Jm, Jp2, Jm2, h)
    g64 = np.asarray(g, np.float64)
    if x.size <= 64:                    # per element: the worst index is exact
        kink = kink.reshape(x.shape)
        c = _compare(np.where(kink, 0.0, g64), np.where(kink, 0.0, np.asarray(fd).reshape(x.shape)), tol)
        c.note = f"{int(kink.sum())} kink(s) left out" if kink.any() else ""
        return c, kink
    directions = np.asarray(steps) / np.asarray(h).reshape((-1,) + (1,) * x.ndim)
    slope = np.tensordot(directions, g64, axes=x.ndim)
    err = np.where(kink, 0.0, np.abs(np.asarray(fd) - slope) / (np.abs(np.asarray(fd)) + np.linalg.norm(g64) + 1e-300))
    k = int(np.argmax(err))
    return Comparison(float(err[k]), float(abs(fd[k] - slope[k])), (), float(slope[k]), float(fd[k]),
                      tol, "directional" + (f", {int(kink.sum())} kink(s) left out" if kink.any() else "")), None


def _kinks(J0, Jp, Jm, Jp2, Jm2, h) -> np.ndarray:
    """Where ``J`` is not smooth within ``h``: the one-sided differences at ``h`` disagree (by
    more than a tenth, and more than 1e-6 of the largest slope), *and* the disagreement does not
    behave as a smooth function's would at ``h/2``.

    For a smooth ``J`` the gap ``fwd − bwd = (J(x+h) − 2J(x) + J(x−h))/h ≈ h J''`` halves with
    the step and the central differences at ``h`` and ``h/2`` agree (to ``O(h²)``); at a kink
    the gap stays (ReLU at 0), and within ``h`` of one the two central differences disagree.
    So ``z²`` at 0, whose gap is ``2h`` but halves, is smooth and checked."""
    fwd, bwd = (Jp - J0) / h, (J0 - Jm) / h
    gap, gap2 = fwd - bwd, (Jp2 - 2 * J0 + Jm2) / (h / 2)
    fd, fd2 = (Jp - Jm) / (2 * h), (Jp2 - Jm2) / h
    disagree = (jnp.abs(gap) > 0.1 * (jnp.abs(fwd) + jnp.abs(bwd))) \
        & (jnp.abs(gap) > 1e-6 * (jnp.max(jnp.abs(fd)) + 1e-300))
    roundoff = 1e2 * _EPS64 * (jnp.abs(J0) + jnp.abs(Jp) + jnp.abs(Jm)) / h
    smooth = (jnp.abs(gap2 - gap / 2) <= 0.25 * jnp.abs(gap) + 4 * roundoff) \
        & (jnp.abs(fd - fd2) <= 1e-6 * (jnp.abs(fd) + jnp.abs(fd2)) + roundoff)
    return np.asarray(disagree & ~smooth)


def _taylor(p: _Problem, i: int, v, g, kink) -> Taylor:
    """Remainders of J along ``δ`` (zero at the kinks the finite differences found)."""
    x = p.leaves[i]
    d = _normal(p.seed, 77 + i, x.shape, x.dtype) * jnp.maximum(1.0, jnp.abs(x))
    if kink is not None:
        d = jnp.where(kink, 0.0, d)
    steps = jnp.asarray([0.0] + _TAYLOR_H, x.dtype).reshape((-1,) + (1,) * x.ndim) * d
    Js = [float(J) for J in p.J_batch(i, v, steps)]
    J0, Js, slope, hs = Js[0], Js[1:], float(jnp.vdot(g, d)), _TAYLOR_H
    r1 = [abs(J - J0) for J in Js]
    r2 = [abs(J - J0 - h * slope) for J, h in zip(Js, hs)]
    floor = [1e3 * _EPS64 * (abs(J0) + abs(J) + abs(h * slope)) + 1e-300 for J, h in zip(Js, hs)]
    exact = all(r <= f for r, f in zip(r2, floor))
    converged = all(r <= f for r, f in zip(r2[-3:], floor[-3:]))
    return Taylor(hs, r1, r2, _rate(r1, floor), _rate(r2, floor), exact, converged)


def _rate(r, floor) -> float:
    """Mean of the last three rates log2(r_k / r_{k+1}) over remainders above the floor."""
    rates = [math.log2(a / b) for a, b, fa, fb in zip(r, r[1:], floor, floor[1:]) if a > fa and b > fb]
    return float(np.mean(rates[-3:])) if rates else float("nan")


def _float64_checks(p64, v64, g64, tol, checks, kinks) -> dict[str, Check]:
    out = {}
    if "adjoint" in checks:
        out["adjoint"] = _guard("adjoint ⟨Jt, v⟩ = ⟨t, Jᵀv⟩", max(FD_TOL, tol),
                                lambda: _adjoint(p64, v64, g64, kinks))
    if "reverse_over_reverse" in checks:
        out["reverse_over_reverse"] = _guard("reverse-over-reverse", FD_TOL,
                                             lambda: _reverse_over_reverse(p64, v64, kinks))
    return out


def _working_dtype_checks(p, v, g, tol, checks, batch_argnums) -> list[Check]:
    out = []
    if "linearity" in checks:
        def linearity():
            v2 = p.cotangent(1)
            lhs = p.pullback(p.leaves, jax.tree.map(lambda a, b: 2.0 * a - 3.0 * b, v, v2))
            rhs = [2.0 * a - 3.0 * b for a, b in zip(g, p.pullback(p.leaves, v2))]
            errors = [_compare(a, e, tol).error for a, e in zip(lhs, rhs)]
            for scale in _linearity_scales(p.dtype):    # B(s v) = s B(v), far from |v| ≈ 1
                scaled = p.pullback(p.leaves, jax.tree.map(lambda a: a * scale, v))
                errors += [_compare(np.asarray(a, np.float64) / scale, e, tol).error
                           for a, e in zip(scaled, g)]
            return max(errors)
        out.append(_guard("linearity in v", 10 * tol, linearity))
    if "jit" in checks:
        out.append(_guard("jit", 10 * tol, lambda: max(
            _compare(a, e, tol).error for a, e in zip(jax.jit(p.pullback_eager)(p.leaves, v), g))))
    if "vmap" in checks:
        out.append(_guard("vmap", 10 * tol, lambda: _vmap_error(p, batch_argnums, tol)))
    return out


def _linearity_scales(dtype: str) -> tuple[float, float]:
    """``10^±6`` (``10^±2`` in float16, whose largest number is 65504): scales of ``v`` at which
    a clipped or normalised cotangent cannot pass for a linear one."""
    return (1e-2, 1e2) if dtype == "float16" else (1e-6, 1e6)


def _guard(name, tol, compute) -> Check:
    """Run one check; an exception (e.g. a backward that breaks under jit) is a failure."""
    try:
        return Check(name, float(compute()), tol)
    except Exception as e:  # noqa: BLE001 — the report says what broke
        return Check(name, float("inf"), tol, f"raised {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def _tangents(p, k0, kinks):
    """Random tangents for every leaf, zero at known kinks."""
    t = [_normal(p.seed, k0 + k, x.shape, x.dtype) for k, x in enumerate(p.leaves)]
    return [ti if kink is None else jnp.where(kink, 0.0, ti) for ti, kink in zip(t, kinks)]


def _adjoint(p, v, g, kinks):
    t = _tangents(p, 500, kinks)
    rhs = sum(float(jnp.vdot(a, b)) for a, b in zip(t, g))
    if p.reference is not None:
        f = lambda *l: p.call(list(l), use_reference=True)
        lhs = _inner(v, jax.jit(lambda l, t: jax.jvp(f, l, t)[1])(tuple(p.leaves), tuple(t)))
    else:
        h = _EPS64 ** (1 / 3) * max(1.0, max(float(jnp.max(jnp.abs(x))) for x in p.leaves))
        shift = jax.jit(lambda s: p.scalar([x + s * h * dx for x, dx in zip(p.leaves, t)], v))
        lhs = (shift(1.0) - shift(-1.0)) / (2 * h)
    lhs = float(lhs)
    return abs(lhs - rhs) / (abs(lhs) + abs(rhs) + 1e-300)


def _reverse_over_reverse(p, v, kinks):
    """``jax.grad`` of ``S(x) = ⟨w, B_x(v)⟩`` (reverse mode through the hand-written backward)
    against float64 central differences of ``S`` itself (less an allowance for their
    round-off), along a random direction. (Not against
    the reference's own second derivative, which can be the less accurate of the two.)"""
    w = [_normal(p.seed, 900 + k, x.shape, x.dtype) for k, x in enumerate(p.leaves)]
    S = lambda leaves: sum(jnp.vdot(a, b) for a, b in zip(w, p.pullback_eager(leaves, v)))
    S, grad = jax.jit(S), jax.jit(jax.grad(S))
    d = _tangents(p, 950, kinks)
    h = _EPS64 ** (1 / 3) * max(1.0, max(float(jnp.max(jnp.abs(x))) for x in p.leaves))
    at = lambda s: float(S([x + s * dx for x, dx in zip(p.leaves, d)]))
    Sp, Sm = at(h), at(-h)
    fd = (Sp - Sm) / (2 * h)
    gS = grad(list(p.leaves))
    slope = sum(float(jnp.vdot(a, b)) for a, b in zip(gS, d))
    norm = math.sqrt(sum(float(jnp.vdot(a, a)) for a in gS))
    # The difference's own round-off, ~ε|S|/h (with a margin of 100), is not evidence of a
    # mistake: only what exceeds it counts (where ∇S is tiny next to S, nothing can be said).
    roundoff = 1e2 * _EPS64 * (abs(Sp) + abs(Sm)) / (2 * h)
    return max(0.0, abs(fd - slope) - roundoff) / (abs(fd) + norm + 1e-300)


def _vmap_error(p: _Problem, batch_argnums, tol) -> float:
    batch = tuple(batch_argnums) if batch_argnums is not None else p.argnums

    def example(b):  # three distinct examples around args
        return [jax.tree.map(lambda x: x + 0.1 * b * _normal(p.seed, 1100 + b, x.shape, x.dtype)
                             if _is_float(x) else x, a) if i in batch else a for i, a in enumerate(p.args)]
    examples = [example(b) for b in range(3)]
    stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *[e[i] for e in examples]) if i in batch else a
               for i, a in enumerate(p.args)]
    vs = [p.cotangent(10 + b) for b in range(3)]
    V = jax.tree.map(lambda *xs: jnp.stack(xs), *vs)
    in_axes = [0 if i in batch else None for i in range(len(p.args))]
    loop = [_Problem(p.fn, e, p.argnums, None, p.backward, p.seed) for e in examples]
    per = [q.pullback(q.leaves, vb) for q, vb in zip(loop, vs)]

    def vjp_all(args, v):
        q = _Problem(p.fn, args, p.argnums, None, p.backward, p.seed)
        return q.pullback_eager(q.leaves, v)
    got = jax.jit(jax.vmap(vjp_all, (in_axes, 0)))(stacked, V)
    errs = [_compare(a, jnp.stack(e), tol).error for a, e in zip(got, zip(*per))]
    if p.backward is None:  # also the gradient of a vmapped sum (grad of vmap)
        pb = jax.jit(lambda a, V: jax.vjp(lambda *a: jax.vmap(p.fn, in_axes)(*a), *a)[1](V))(stacked, V)
        cts = jax.tree.leaves(tuple(pb[i] for i in p.argnums))
        batched_leaf = [i in batch for i in p.argnums for _ in jax.tree.leaves(p.args[i])]
        for c, e, b in zip(cts, zip(*per), batched_leaf):
            errs.append(_compare(c, jnp.stack(e) if b else sum(e), tol).error)
    return max(errs)

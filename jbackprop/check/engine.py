"""Prove a hand-written VJP right: ``verify_vjp`` checks it against independent evidence.

For a function ``fn`` with a hand-written VJP (any ``jax.custom_vjp`` function, or any function
plus a separate ``backward(*args, v)``), ``verify_vjp`` returns a ``Report`` (see
``jbackprop.check.report``). Per differentiable leaf, for a random cotangent ``v``:

1. **autodiff**: the VJP against ``jax.vjp`` of a pure ``reference`` forward (if given), run in
   float64 (the truth);
2. **finite differences**: central differences in float64 (per element for leaves of up to
   512 elements, along random directions otherwise), each at the step where it is most
   accurate (``jbackprop.check.differences``); kinks (ReLU at 0) are found from ``J``'s
   behaviour, reported and left out;
3. **Taylor**: ``|J(x+hδ) − J(x)|`` must shrink at rate 1 and
   ``|J(x+hδ) − J(x) − h⟨∇J, δ⟩|`` at rate 2 (``J = ⟨v, fn(x)⟩``, float64).

Both comparisons are per element, against ``|e_i| + scale_i`` where ``scale_i`` is the
element's local scale (``differences.local_scale``), never the leaf's largest element. Integer
and bool leaves are listed too: their cotangents must be ``float0`` zeros (or ``None``).

Then the whole-function checks (``jbackprop.check.whole`` and ``.contract``): the contract
(shapes and dtypes), integer leaves, the primal, zeros, determinism, the precision budget
against the reference in the same dtype, the adjoint (dot-product) test, linearity in ``v``
(also at ``v · 10^±6``), jit, vmap (each float argument batched in turn), reverse-over-reverse
and non-finite cotangents at stress inputs. The residual bytes come from
``jax.ad_checkpoint.print_saved_residuals``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop._compat import enable_x64
from jbackprop.check import differences as fd
from jbackprop.check.differences import FD_TOL
from jbackprop.check.arrays import compare as _compare, inner as _inner, is_float as _is_float
from jbackprop.check.arrays import labels as _labels, normal as _normal, to64 as _to64
from jbackprop.check.report import Comparison, Leaf, Report, saved_residuals

# Relative tolerance of a hand-written cotangent, per element, by the dtype it is computed in.
TOLERANCES = {"float64": 1e-9, "float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
PER_ELEMENT = 512         # leaves up to this size get finite differences per element
FLAT_SHIFT_LIMIT = 4_000_000   # numbers of the shifted inputs and outputs for one compiled call
_DIRECTIONS = 3
ALL_CHECKS = ("contract", "integer_leaves", "primal", "zeros", "determinism", "autodiff",
              "precision", "finite_differences", "taylor", "adjoint", "linearity", "jit", "vmap",
              "reverse_over_reverse", "nonfinite")


def verify_vjp(fn: Callable, *args: Any, reference: Callable | None = None,
               backward: Callable | None = None, argnums: Sequence[int] | None = None,
               batch_argnums: Sequence[int] | None = None, name: str | None = None,
               rtol: float | None = None, checks: Sequence[str] = ALL_CHECKS,
               seed: int = 0) -> Report:
    """Verify the VJP of ``fn`` at ``args`` and return a ``Report``.

    Args:
      fn: the forward; its VJP is ``jax.vjp(fn, ...)`` (a ``custom_vjp`` rule), unless
        ``backward`` is given.
      *args: the inputs (pytrees of arrays; integer and bool leaves are not differentiated, and
        their cotangents must be ``float0`` zeros or ``None``).
      reference: a pure forward of the same mathematics, differentiated by JAX itself.
      backward: ``backward(*args, v) -> tuple`` of cotangents of every argument (the notes'
        form, e.g. ``jb.backward(jb.mm)``), to check instead of ``fn``'s own VJP.
      argnums: arguments to differentiate (default: every argument with a floating leaf).
      batch_argnums: arguments that carry the batch in the vmap check (default: each
        differentiated argument in turn, then the data arguments together).
      name: for the report (default: ``fn.__name__``).
      rtol: tolerance per element (default: ``TOLERANCES`` by dtype).
      checks: a subset of ``ALL_CHECKS``.
      seed: for the random cotangents, directions and batches.
    """
    from jbackprop.check import whole
    unknown = set(checks) - set(ALL_CHECKS)
    if unknown:
        raise ValueError(f"verify_vjp: unknown checks {sorted(unknown)}; choose from {ALL_CHECKS}")
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args) if any(_is_float(x) for x in jax.tree.leaves(a)))
    if not argnums:
        raise ValueError("verify_vjp: no floating-point argument to differentiate")
    bad = [i for i in argnums if not isinstance(i, int) or not 0 <= i < len(args)]
    if bad:
        raise ValueError(f"verify_vjp: argnums {tuple(argnums)} out of range for {len(args)} arguments")
    prob = _Problem(fn, tuple(args), tuple(argnums), reference, backward, seed)
    if not prob.leaves:
        raise ValueError(f"verify_vjp: arguments {tuple(argnums)} have no floating-point leaf")
    tol = rtol if rtol is not None else TOLERANCES.get(prob.dtype, 1e-4)
    v = prob.cotangent(0)
    g = prob.pullback_eager(prob.leaves, v)    # eagerly: the jit check compares against it
    leaves = [Leaf(lab, tuple(x.shape), str(x.dtype)) for lab, x in zip(prob.labels, prob.leaves)]
    with enable_x64(True):  # the evidence: float64 truth, finite differences, Taylor, 2nd order
        p64 = prob.in_float64()
        v64 = _to64(v)
        g64 = p64.pullback(p64.leaves, v64)
        truth = p64.pullback(p64.leaves, v64, use_reference=True) if reference else None
        evidence = (lambda l, w: p64.pullback(l, w, use_reference=True)) if reference else p64.pullback
        scale = fd.local_scale(evidence, p64.leaves, v64, seed)
        if truth is not None and "autodiff" in checks:
            for leaf, a, e, s in zip(leaves, g, truth, scale):
                leaf.autodiff = _compare(a, e, tol, s)
        plans = [_fd_steps(p64, i) for i in range(len(leaves))]
        moved = p64.J_batches(v64, [plan[0] for plan in plans])    # every leaf, one call
        kinks, units = [], []
        for i, leaf in enumerate(leaves):
            fdc, kink, unit = _finite_differences(p64, i, g[i], scale[i], max(FD_TOL, tol),
                                                  plans[i], moved[i])
            kinks.append(kink)
            units.append(unit)
            if "finite_differences" in checks:
                leaf.finite_differences = fdc
        if "taylor" in checks:
            directions = [fd.taylor_steps(x, u, k, seed + i)
                          for i, (x, u, k) in enumerate(zip(p64.leaves, units, kinks))]
            moved = p64.J_batches(v64, [steps for _, steps in directions])
            for leaf, out, gi, (d, _) in zip(leaves, moved, g64, directions):
                leaf.taylor = fd.taylor_from(out, gi, d)
        wide = whole.float64_checks(p64, v64, g64, tol, checks, kinks)
        out_scale = fd.local_scale(lambda l, w: jax.tree.leaves(p64.call_compiled(l, reference is not None)),
                                   p64.leaves, v64, seed) if "primal" in checks else None
    report_checks = whole.working_dtype_checks(prob, v, g, tol, checks, scale, truth, leaves,
                                               batch_argnums, out_scale)
    report_checks += [wide[k] for k in ("adjoint", "reverse_over_reverse") if k in wide]
    nbytes, residuals = saved_residuals(lambda *l: prob.call(list(l)), prob.leaves, prob.labels) \
        if backward is None else (None, [])
    return Report(name or getattr(fn, "__name__", "fn"), prob.dtype, leaves, report_checks,
                  nbytes, residuals)


class _Problem:
    """``fn`` and its VJP as functions of the flat list of floating leaves of ``args[argnums]``
    (integer and bool leaves stay in place, as constants)."""

    def __init__(self, fn, args, argnums, reference, backward, seed):
        self.fn, self.args, self.argnums = fn, tuple(args), tuple(argnums)
        self.reference, self.backward, self.seed = reference, backward, seed
        self.all_leaves, self.treedef = jax.tree.flatten(tuple(args[i] for i in argnums))
        self.float_pos = tuple(k for k, x in enumerate(self.all_leaves) if _is_float(x))
        self.leaves = [self.all_leaves[k] for k in self.float_pos]
        self.dtype = str(jnp.result_type(*self.leaves)) if self.leaves else "float32"

    @functools.cached_property
    def all_labels(self) -> list[str]:
        return _labels(self.fn, self.args, self.argnums)

    @property
    def labels(self) -> list[str]:
        return [self.all_labels[k] for k in self.float_pos]

    @functools.cached_property
    def out(self):
        return jax.eval_shape(lambda *l: self.call(list(l)), *self.leaves)

    def full_args(self, leaves, all_leaves=None):
        flat = list(self.all_leaves if all_leaves is None else all_leaves)
        for k, x in zip(self.float_pos, leaves):
            flat[k] = x
        a = list(self.args)
        for i, d in zip(self.argnums, jax.tree.unflatten(self.treedef, flat)):
            a[i] = d
        return a

    def call(self, leaves, use_reference=False):
        return (self.reference if use_reference else self.fn)(*self.full_args(leaves))

    def call_compiled(self, leaves, use_reference=False):
        """``call``, compiled once per function and shapes (for repeated evaluations)."""
        return _call_jit(self.fn, self.reference, self.argnums, bool(use_reference),
                         _rules(self.fn), self.args, list(leaves))

    def pullback(self, leaves, v, use_reference=False):
        """Cotangents of the floating leaves (jit-compiled; shared by same-shaped calls).

        A backward that cannot be compiled runs eagerly here; the jit check reports it."""
        try:
            return _pullback_jit(self.fn, self.reference, self.backward, self.argnums,
                                 bool(use_reference), _rules(self.fn), self.args, list(leaves), v)
        except Exception:  # noqa: BLE001
            return self.pullback_eager(leaves, v, use_reference)

    def pullback_eager(self, leaves, v, use_reference=False):
        """Cotangents of the floating leaves: the hand-written VJP, or the reference's."""
        if self.backward is not None and not use_reference:
            return [self.notes_cotangents(leaves, v)[k] for k in self.float_pos]
        f = lambda *l: self.call(list(l), use_reference)
        return list(jax.vjp(f, *leaves)[1](v))

    def notes_cotangents(self, leaves, v) -> list:
        """Every leaf's cotangent from ``backward(*args, v)`` (``None`` kept in its place)."""
        cts = self.backward(*self.full_args(leaves), v)
        return [c for i in self.argnums
                for c in jax.tree.flatten(cts[i], is_leaf=lambda x: x is None)[0]]

    def J_batch(self, i, v, dxs):
        """``(J(x + dx) − J(x), round-off)`` of ``J = ⟨v, fn(x)⟩``, leaf ``i`` shifted by each
        of ``dxs`` (``(comparands, shifts, *x.shape)``, one compiled call; ``differences.moved``)."""
        return _J_batch_jit(self.fn, self.argnums, i, self.args, list(self.leaves), v, dxs)

    def J_batches(self, v, dxs_per_leaf) -> list:
        """``J_batch`` of every leaf ``i`` at ``dxs_per_leaf[i]`` (the same number of shifts
        for all). One compiled call for all the leaves when the shifts fit in
        ``FLAT_SHIFT_LIMIT`` numbers: each leaf's shifts are laid out in the vector of all the
        leaves (zero elsewhere: ``x + 0`` is ``x``, so the numbers are those of ``J_batch``),
        and ``fn`` is compiled once instead of once per leaf. Otherwise leaf by leaf."""
        sizes = [x.size for x in self.leaves]
        comparands = [d.shape[0] for d in dxs_per_leaf]
        shifts = dxs_per_leaf[0].shape[1]
        if sum(comparands) * shifts * (sum(sizes) + self.out_size) > FLAT_SHIFT_LIMIT:
            return [self.J_batch(i, v, d) for i, d in enumerate(dxs_per_leaf)]
        starts = np.cumsum([0] + sizes)
        rows = [jnp.zeros((c, shifts, sum(sizes)), d.dtype).at[..., a:b].set(
                    d.reshape(c, shifts, b - a))
                for c, d, a, b in zip(comparands, dxs_per_leaf, starts[:-1], starts[1:])]
        out = _J_batch_flat(self.fn, self.argnums, self.args, list(self.leaves), v,
                                jnp.concatenate(rows))
        cuts = np.cumsum(comparands)[:-1]
        return [tuple(part) for part in zip(*(np.split(np.asarray(a), cuts) for a in out))]

    @functools.cached_property
    def out_size(self) -> int:
        return sum(int(np.prod(o.shape)) for o in jax.tree.leaves(self.out))

    def scalar(self, leaves, v):
        """J = ⟨v, fn(x)⟩."""
        return _inner(v, self.call(leaves))

    def cotangent(self, k, out=None):
        out = self.out if out is None else out
        return jax.tree.map(lambda o: _normal(self.seed, 1000 + k, o.shape, o.dtype), out)

    def with_args(self, args) -> "_Problem":
        return _Problem(self.fn, args, self.argnums, self.reference, self.backward, self.seed)

    def in_float64(self) -> "_Problem":
        return self.with_args(_to64(self.args))


def _rules(fn) -> tuple:
    """The rules a function has now: ``fwd``, ``bwd`` (and ``jvp``) of a ``custom_vjp`` or
    ``custom_rules`` function (or of a module's core).

    Part of the compiled pullback's cache key, so that a rule redefined on the same object
    (``f.defvjp(fwd, fixed_bwd)``) is seen at the next call, not the stale compilation."""
    fn = getattr(fn, "func", fn)                          # a functools.partial
    core = getattr(fn, "core", fn)
    return getattr(core, "fwd", None), getattr(core, "bwd", None), getattr(core, "jvp", None)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _pullback_jit(fn, reference, backward, argnums, use_reference, rules, args, leaves, v):
    del rules                                             # in the cache key only
    return _Problem(fn, args, argnums, reference, backward, 0).pullback_eager(leaves, v, use_reference)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _call_jit(fn, reference, argnums, use_reference, rules, args, leaves):
    del rules                                             # in the cache key only
    return _Problem(fn, args, argnums, reference, None, 0).call(leaves, use_reference)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _J_batch_jit(fn, argnums, i, args, leaves, v, dxs):
    p = _Problem(fn, args, argnums, None, None, 0)
    base = p.call(leaves)

    def out(dx):
        shifted = list(leaves)
        shifted[i] = leaves[i] + dx
        return p.call(shifted)
    return jax.vmap(lambda d: fd.moved(jax.vmap(out)(d), base, v))(dxs)


def _fd_steps(p: _Problem, i: int):
    """``(steps, h0, directions)`` of leaf ``i``'s finite differences: per element ``s = e_j``
    for leaves of up to ``PER_ELEMENT`` elements (``directions`` None), else along random
    directions; each at every step of the ladder, ``(comparands, ladder + probe, *x.shape)``."""
    x = p.leaves[i]
    mult = jnp.asarray(fd.ladder_and_probe(), x.dtype)
    directions = None
    if x.size <= PER_ELEMENT:
        h0 = fd.base_step(x).reshape(-1)
        basis = jnp.eye(x.size, dtype=x.dtype) * jnp.asarray(h0, x.dtype)[:, None]
    else:
        directions = jnp.stack([_normal(p.seed, 50 + k, x.shape, x.dtype).reshape(-1) for k in range(_DIRECTIONS)])
        h0 = np.full(_DIRECTIONS, fd.base_step(np.max(np.abs(np.asarray(x)))))
        basis = directions * jnp.asarray(h0, x.dtype)[:, None]
    steps = (basis[:, None, :] * mult[None, :, None]).reshape((len(basis), len(mult), *x.shape))
    return steps, h0, directions


@functools.partial(jax.jit, static_argnums=(0, 1))
def _J_batch_flat(fn, argnums, args, leaves, v, dflat):
    """``_J_batch_jit`` for shifts ``dflat (comparands, shifts, total)`` of all the leaves laid
    end to end (``_Problem.J_batches``)."""
    p = _Problem(fn, args, argnums, None, None, 0)
    base = p.call(leaves)
    flat = jnp.concatenate([x.reshape(-1) for x in leaves])
    starts = np.cumsum([0] + [x.size for x in leaves])

    def out(d):
        moved = flat + d
        return p.call([moved[a:b].reshape(x.shape) for x, a, b in zip(leaves, starts, starts[1:])])
    return jax.vmap(lambda ds: fd.moved(jax.vmap(out)(ds), base, v))(dflat)


def _finite_differences(p: _Problem, i: int, g, scale, tol: float, plan, moved):
    """Central differences of ``J = ⟨v, fn(x)⟩`` against the hand-written ``g`` (leaf ``i``),
    from ``moved`` (``J_batch`` at ``plan = _fd_steps(p, i)``), each at its best step on the
    ladder (``differences.central_differences``). Kinks are left out. Returns the comparison,
    the kink mask (or None) and the unit of the Taylor direction (the scale on which ``J``
    varies, per element)."""
    x = p.leaves[i]
    _, h0, directions = plan
    dJ, R, still = (np.asarray(a).T[:-1] for a in moved)   # (ladder, comparands)
    value, noise, kink, step = fd.central_differences(dJ, R, h0, still[0])
    g64 = np.asarray(g, np.float64)
    note = f"{int(kink.sum())} kink(s) left out" if kink.any() else ""
    if directions is None:                       # per element: the worst index is exact
        kink = kink.reshape(x.shape)
        c = _compare(np.where(kink, 0.0, g64), np.where(kink, 0.0, value.reshape(x.shape)), tol,
                     scale, noise.reshape(x.shape))
        c.note = note
        return c, kink, (step / fd.EPS64 ** (1 / 3)).reshape(x.shape)
    d = np.asarray(directions, np.float64)
    slope = d @ g64.reshape(-1)
    c = _compare(np.where(kink, 0.0, slope), np.where(kink, 0.0, value), tol,
                 np.abs(d) @ np.asarray(scale).reshape(-1), noise)
    unit = np.maximum(1.0, np.abs(np.asarray(x, np.float64))) * float(np.median(step / h0))
    return Comparison(c.error, c.max_abs, (), c.actual, c.expected, tol,
                      "directional" + (", " + note if note else "")), None, unit

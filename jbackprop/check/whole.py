"""The whole-function checks of ``verify_vjp``: each a named ``Check`` in the report and JSON.

In the working dtype: the primal, zeros, the precision budget, linearity in ``v``, jit, vmap
(every float argument batched in turn) and non-finite cotangents at stress inputs; in float64:
the adjoint (dot-product) test and reverse-over-reverse. The contract, integer leaves and
determinism are in ``jbackprop.check.contract``. ``p`` is the engine's ``_Problem``: ``fn`` and
its VJP as functions of the floating leaves.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop.check import differences as fd
from jbackprop.check.differences import FD_TOL
from jbackprop.check.arrays import compare, inner, normal
from jbackprop.check.contract import cotangent_contract, determinism, integer_leaves
from jbackprop.check.report import Check

PRECISION_FACTOR = 8      # the rule's error may be this many times the reference's (or 8 ε)
STRESS = (10.0, 1e3, 1e6)  # inputs scaled by these must still give finite cotangents


def guard(key, name, tol, compute) -> Check:
    """Run one check; an exception (e.g. a backward that breaks under jit) is a failure.
    ``compute`` returns the error, or ``(error, note)``."""
    try:
        out = compute()
        error, note = out if isinstance(out, tuple) else (out, "")
        return Check(name, float(error), tol, note, key=key)
    except Exception as e:  # noqa: BLE001 — the report says what broke
        return Check(name, float("inf"), tol,
                     f"raised {type(e).__name__}: {str(e).splitlines()[0][:200]}", key=key)


def working_dtype_checks(p, v, g, tol, checks, scale, truth, leaves, batch_argnums,
                         out_scale) -> list[Check]:
    ref_g = p.pullback(p.leaves, v, use_reference=True) if p.reference else None
    worst = lambda pairs, s=scale, t=tol: max([compare(a, e, t, si).error
                                               for (a, e), si in zip(pairs, s)], default=0.0)
    run = {
        "contract": lambda: cotangent_contract(p.labels, p.leaves, g, ref_g),
        "integer_leaves": lambda: integer_leaves(p, v, leaves),
        "primal": lambda: guard("primal", "primal (forward rule = function = reference)", tol,
                                lambda: _primal(p, tol, out_scale)),
        "zeros": lambda: guard("zeros", "zeros (v = 0 and unused outputs)", 10 * tol,
                               lambda: _zeros(p, v, tol, scale)),
        "determinism": lambda: determinism(p.labels, g, p.pullback_eager(p.leaves, v)),
        "precision": lambda: _precision(p, g, ref_g, truth, scale, leaves),
        "linearity": lambda: guard("linearity", "linearity in v", 10 * tol,
                                   lambda: _linearity(p, v, g, tol, scale)),
        "jit": lambda: guard("jit", "jit", 10 * tol, lambda: worst(
            zip(jax.jit(p.pullback_eager)(p.leaves, v), g))),
        "vmap": lambda: guard("vmap", "vmap", 10 * tol,
                              lambda: _vmap(p, batch_argnums, tol, scale)),
        "nonfinite": lambda: guard("nonfinite", "non-finite (inputs ×10, ×10³, ×10⁶)", 0.0,
                                   lambda: _nonfinite(p, v)),
    }
    return [run[k]() for k in run if k in checks]


def float64_checks(p64, v64, g64, tol, checks, kinks) -> dict[str, Check]:
    out = {}
    if "adjoint" in checks:
        out["adjoint"] = guard("adjoint", "adjoint ⟨Jt, v⟩ = ⟨t, Jᵀv⟩", max(FD_TOL, tol),
                               lambda: _adjoint(p64, v64, g64, kinks))
    if "reverse_over_reverse" in checks:
        out["reverse_over_reverse"] = guard("reverse_over_reverse", "reverse-over-reverse", FD_TOL,
                                            lambda: _reverse_over_reverse(p64, v64, kinks))
    return out


def _primal(p, tol, out_scale):
    """The rule's forward output (``jax.vjp``'s primal, from the ``fwd`` rule) equals the
    function's and the reference's: same shapes and dtypes, values per element."""
    outs = {"function": jax.tree.leaves(p.call(p.leaves))}
    if p.backward is None:
        outs["forward rule"] = jax.tree.leaves(jax.vjp(lambda *l: p.call(list(l)), *p.leaves)[0])
    if p.reference is not None:
        outs["reference"] = jax.tree.leaves(p.call(p.leaves, use_reference=True))
    base, errors, notes = outs["function"], [0.0], []
    for what, o in outs.items():
        kinds = [f"{jnp.shape(a)} {jnp.result_type(a)}" for a in o]
        want = [f"{jnp.shape(a)} {jnp.result_type(a)}" for a in base]
        if kinds != want:
            notes.append(f"{what} gives {kinds}, the function {want}")
            errors.append(float("inf"))
            continue
        for k, (a, e, s) in enumerate(zip(o, base, out_scale)):
            c = compare(a, e, tol, s)
            errors.append(c.error)
            if c.error > tol:
                notes.append(f"{what} output {k} at {c.worst_index}: {c.actual!r}, function {c.expected!r}")
    return max(errors), "; ".join(notes)


def _zeros(p, v, tol, scale):
    """``B(0) = 0`` exactly (no NaN from 0/0); with several outputs, the cotangent of the outputs
    used alone (a symbolic zero for the others, as ``jax.grad`` of one output gives) equals
    ``B`` at ``v`` with the others' cotangents set to numeric zeros."""
    zero = jax.tree.map(jnp.zeros_like, v)
    bad = [lab for lab, a in zip(p.labels, p.pullback(p.leaves, zero)) if np.any(np.asarray(a) != 0)]
    if bad:
        return float("inf"), f"v = 0 gives non-zero (or NaN) cotangents for {', '.join(bad)}"
    vs, tree = jax.tree.flatten(v)
    if len(vs) < 2 or p.backward is not None:
        return 0.0
    errors = []
    for k, vk in enumerate(vs):
        only_k = jax.tree.unflatten(tree, [a if j == k else jnp.zeros_like(a) for j, a in enumerate(vs)])
        numeric = p.pullback(p.leaves, only_k)
        symbolic = jax.vjp(lambda *l: jax.tree.leaves(p.call(list(l)))[k], *p.leaves)[1](vk)
        errors += [compare(a, e, tol, s).error for a, e, s in zip(symbolic, numeric, scale)]
    return max(errors)


def _precision(p, g, ref_g, truth, scale, leaves) -> Check:
    """In float32/16 and bfloat16: the rule's error against float64 truth is within
    ``PRECISION_FACTOR`` of the error of the reference's autodiff run in the same dtype (the
    budget FlashAttention's tests use), or of ``PRECISION_FACTOR · ε``. Both errors are per
    element relative to ``|e_i| + ε s_i``: the round-off that the element's local scale ``s_i``
    forces on any evaluation in this dtype, so that the budget compares accuracy where the
    per-element tolerance (against ``|e_i| + s_i``) forgives it."""
    name = f"precision (vs the reference's autodiff in {p.dtype})"
    if ref_g is None or truth is None or p.dtype == "float64":
        why = "float64: its round-off is the truth" if p.dtype == "float64" else "no reference"
        return Check(name, 0.0, 1.0, why, skipped=True, key="precision")
    eps = float(jnp.finfo(p.dtype).eps)
    ratio, notes = 0.0, []
    for leaf, a, r, e, s in zip(leaves, g, ref_g, truth, scale):
        ref_err = compare(r, e, 1.0, eps * s).error
        rule_err = compare(a, e, 1.0, eps * s).error
        budget = PRECISION_FACTOR * max(ref_err, eps)
        ratio = max(ratio, rule_err / budget)
        if rule_err > budget:
            notes.append(f"{leaf.leaf}: error {rule_err:.2g}, the reference's {ref_err:.2g}")
    return Check(name, ratio, 1.0, "; ".join(notes), key="precision")


def _linearity(p, v, g, tol, scale):
    v2 = p.cotangent(1)
    lhs = p.pullback(p.leaves, jax.tree.map(lambda a, b: 2.0 * a - 3.0 * b, v, v2))
    rhs = [2.0 * a - 3.0 * b for a, b in zip(g, p.pullback(p.leaves, v2))]
    errors = [compare(a, e, tol, 5 * s).error for a, e, s in zip(lhs, rhs, scale)]
    for factor in linearity_scales(p.dtype):           # B(s v) = s B(v), far from |v| ≈ 1
        scaled = p.pullback(p.leaves, jax.tree.map(lambda a: a * factor, v))
        errors += [compare(np.asarray(a, np.float64) / factor, e, tol, s).error
                   for a, e, s in zip(scaled, g, scale)]
    return max(errors)


def linearity_scales(dtype: str) -> tuple[float, float]:
    """``10^±6`` (``10^±2`` in float16, whose largest number is 65504): scales of ``v`` at which
    a clipped or normalised cotangent cannot pass for a linear one."""
    return (1e-2, 1e2) if dtype == "float16" else (1e-6, 1e6)


def _nonfinite(p, v):
    """At the inputs scaled by 10, 10³ and 10⁶, wherever the forward is finite (and defined: a
    point the function refuses, such as a soft label above 1, is skipped), every cotangent is
    finite: "numerics stay finite where the math is". (Not gated on the reference's
    cotangents: autodiff of a naive reference is often the one that overflows.)"""
    for factor in (1.0,) + STRESS:
        leaves = [x * jnp.asarray(factor, x.dtype) for x in p.leaves]
        try:
            outputs = jax.tree.leaves(p.call(leaves))
        except (ValueError, TypeError):   # outside the function's domain (a soft label > 1)
            continue
        if not all(bool(jnp.all(jnp.isfinite(o))) for o in outputs):
            continue
        cts = p.pullback(leaves, v)
        bad = [lab for lab, c in zip(p.labels, cts) if not bool(jnp.all(jnp.isfinite(c)))]
        if bad:
            return float("inf"), (f"non-finite cotangent of {', '.join(bad)} at the inputs ×{factor:g}, "
                                  f"where the forward is finite" + _locate(p, leaves, v))
    return 0.0


def _locate(p, leaves, v) -> str:
    """Which module's backward made it, when ``fn`` is built from jbackprop modules."""
    try:
        from jbackprop.check.nonfinite import locate_nonfinite
        found = locate_nonfinite(lambda *l: p.call(list(l)), *leaves, v=v)
        return f" ({found})"
    except Exception:  # noqa: BLE001 — the localisation is a courtesy; the check has failed
        return ""


def _tangents(p, k0, kinks):
    """Random tangents for every leaf, zero at known kinks."""
    t = [normal(p.seed, k0 + k, x.shape, x.dtype) for k, x in enumerate(p.leaves)]
    return [ti if kink is None else jnp.where(kink, 0.0, ti) for ti, kink in zip(t, kinks)]


def _top_step(p) -> float:
    return float(fd.base_step(max(float(jnp.max(jnp.abs(x), initial=0.0)) for x in p.leaves)))


def _adjoint(p, v, g, kinks):
    """``⟨J t, v⟩ = ⟨t, Jᵀ v⟩``: ``J t`` from the reference's JVP, else central differences at
    their best step."""
    t = _tangents(p, 500, kinks)
    rhs = sum(float(jnp.vdot(a, b)) for a, b in zip(t, g))
    noise = 0.0
    if p.reference is not None:
        f = lambda *l: p.call(list(l), use_reference=True)
        lhs = float(inner(v, jax.jit(lambda l, t: jax.jvp(f, l, t)[1])(tuple(p.leaves), tuple(t))))
    else:
        base = p.call(p.leaves)
        shift = jax.jit(lambda ss: fd.moved(jax.vmap(
            lambda s: p.call([x + s * dx for x, dx in zip(p.leaves, t)]))(ss), base, v))
        lhs, noise = fd.scalar_derivative(shift, _top_step(p))
    return max(0.0, abs(lhs - rhs) - noise) / (abs(lhs) + abs(rhs) + 1e-300)


def _reverse_over_reverse(p, v, kinks):
    """``jax.grad`` of ``S(x) = ⟨w, B_x(v)⟩`` (reverse mode through the hand-written backward)
    against float64 central differences of ``S`` itself at their best step, along a random
    direction (not against the reference's second derivative, which can be the less accurate)."""
    w = [normal(p.seed, 900 + k, x.shape, x.dtype) for k, x in enumerate(p.leaves)]
    S = lambda leaves: sum(jnp.vdot(a, b) for a, b in zip(w, p.pullback_eager(leaves, v)))
    grad = jax.jit(jax.grad(S))
    d = _tangents(p, 950, kinks)
    base = p.pullback(p.leaves, v)
    shift = jax.jit(lambda ss: fd.moved(jax.vmap(
        lambda s: p.pullback_eager([x + s * dx for x, dx in zip(p.leaves, d)], v))(ss), base, w))
    fd_value, noise = fd.scalar_derivative(shift, _top_step(p))
    gS = grad(list(p.leaves))
    slope = sum(float(jnp.vdot(a, b)) for a, b in zip(gS, d))
    norm = math.sqrt(sum(float(jnp.vdot(a, a)) for a in gS))
    return max(0.0, abs(fd_value - slope) - noise) / (abs(fd_value) + norm + 1e-300)


def _vmap(p, batch_argnums, tol, scale):
    """The VJP under ``jax.vmap`` against a Python loop over three examples, for each set of
    batched arguments: each differentiated argument alone, then the data together (all but a
    leading parameter pytree), or just ``batch_argnums`` if given."""
    if batch_argnums is not None:
        sets = [tuple(batch_argnums)]
    else:
        first = p.args[p.argnums[0]]
        data = p.argnums[1:] if len(p.argnums) > 1 and isinstance(first, (dict, list, tuple)) else p.argnums
        sets = list(dict.fromkeys([(i,) for i in p.argnums] + [tuple(data)]))
    worst, note = 0.0, ""
    for batch in sets:
        try:
            err = _vmap_error(p, batch, tol, scale)
        except Exception as e:  # noqa: BLE001
            err, why = float("inf"), f"raised {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        else:
            why = f"error {err:.2g}"
        if err > worst or (err == worst == float("inf")):
            worst, note = err, f"batching arguments {batch}: {why}"
    return worst, (note if worst > 10 * tol else "")


def _vmap_error(p, batch, tol, scale) -> float:
    def example(b):  # three distinct examples around args
        return [jax.tree.map(lambda x: x + 0.1 * b * normal(p.seed, 1100 + b, x.shape, x.dtype)
                             if jnp.issubdtype(x.dtype, jnp.floating) else x, a)
                if i in batch else a for i, a in enumerate(p.args)]
    examples = [example(b) for b in range(3)]
    stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *[e[i] for e in examples]) if i in batch else a
               for i, a in enumerate(p.args)]
    vs = [p.cotangent(10 + b) for b in range(3)]
    V = jax.tree.map(lambda *xs: jnp.stack(xs), *vs)
    in_axes = [0 if i in batch else None for i in range(len(p.args))]
    loop = [p.with_args(e) for e in examples]
    per = [q.pullback(q.leaves, vb) for q, vb in zip(loop, vs)]

    def vjp_all(args, v):
        q = p.with_args(args)
        return q.pullback_eager(q.leaves, v)
    got = jax.jit(jax.vmap(vjp_all, (in_axes, 0)))(stacked, V)
    errs = [compare(a, jnp.stack(e), tol, np.stack([s] * 3)).error for a, e, s in zip(got, zip(*per), scale)]
    if p.backward is None:  # also the gradient of a vmapped sum (grad of vmap)
        pb = jax.jit(lambda a, V: jax.vjp(lambda *a: jax.vmap(p.fn, in_axes)(*a), *a)[1](V))(stacked, V)
        flat = [c for i in p.argnums for c in jax.tree.leaves(pb[i])]
        cts = [flat[k] for k in p.float_pos]
        batched = [i in batch for i in p.argnums for _ in jax.tree.leaves(p.args[i])]
        batched = [batched[k] for k in p.float_pos]
        for c, e, b, s in zip(cts, zip(*per), batched, scale):
            errs.append(compare(c, jnp.stack(e) if b else sum(e), tol,
                                np.stack([s] * 3) if b else 3 * s).error)
    return max(errs)

"""Both modes by hand: ``custom_rules``, a function with a hand-written JVP *and* VJP.

``jax.custom_vjp`` holds a reverse rule only (``jax.jvp`` of it raises), ``jax.custom_jvp`` a
forward rule only (``jax.grad`` then transposes the JVP), and JAX cannot give one function both
(jax#16049, #3996, #19146). ``custom_rules`` does, with two small primitives:

* ``jbackprop_call`` (the function). Evaluated or compiled, it runs the primal function.
  Its **JVP rule** runs the hand-written forward rule ``fwd`` (output and residuals) and binds
* ``jbackprop_linear`` (the tangent map on the residuals), *linear* in its tangent inputs:
  its evaluation is the hand-written **JVP** ``J ż``, and its **transpose rule** is the
  hand-written **backward** ``Jᵀ v``.

So ``jax.jvp``, ``jax.jacfwd`` and ``jax.linearize`` evaluate ``jbackprop_linear`` and run the
JVP; ``jax.grad`` / ``jax.vjp`` linearise, then transpose ``jbackprop_linear``, and run the
backward — never the transpose of the JVP, never autodiff of the forward. Residuals are those of
``fwd``, as in ``custom_vjp``; one ``fwd`` serves both rules.

Second order. ``fwd`` calls the function itself (the primitive again), so an outer JVP of a
gradient (``jax.hessian``, forward over reverse) runs the hand-written JVP on every forward
module; the arithmetic of the hand-written backward (and of the residuals) that the gradient
consists of is then differentiated by JAX (it is the derivative of the rule, which no
first-order rule supplies). The JVP rule of ``jbackprop_linear`` likewise takes the hand-written
JVP for its tangent inputs and JAX's derivative of the rule's arithmetic for its residuals.

Batching. ``jbackprop_call`` under ``jax.vmap`` runs the same function on the whole batch when
the batched arguments are declared to take leading batch axes (``batch_argnums``); otherwise,
and for ``jbackprop_linear``, the rules themselves are vmapped (``Vmapped``): still the
hand-written rules, batched by JAX, under the ``axis_name`` of the user's ``jax.vmap`` (so
collectives in the rules, ``lax.pmean`` over a hyper-parameter ``axis_name``, see the batch).

Rule signatures (those of ``custom_vjp``, plus the JVP)::

    fwd(*args, **hyper) -> (out, residuals)
    bwd(*hyper_values, residuals, v) -> (arg_bar, ...)          # one per array argument
    jvp(*hyper_values, residuals, *arg_dots) -> out_dot         # J ż, summed over arguments

``hyper`` are the non-differentiable arguments (``nondiff_argnames``), static and hashable.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import tree_util

from jbackprop._compat import (Primitive, ad, def_batcher, explicit_sharding, mlir, shaped_array,
                               varying_axes_of_aval, weakly_typed)
from jbackprop.modules.vmapped import (Hashable, Vmapped, broadcast_first, flat_cotangents,
                                       names_axis, vmap_under)

__all__ = ["custom_rules"]


class custom_rules:
    """A function with a hand-written forward-mode rule and a hand-written reverse-mode rule.

    Example (the tutorial in ``docs/forward-mode.md`` has more)::

        @jb.custom_rules
        def cube(z):
            return z ** 3 / 3

        def cube_fwd(z):
            return cube(z), z                      # residual: z

        def cube_bwd(z, v):
            return (z * z * v,)                    # B(v) = z² ⊙ v

        def cube_jvp(z, z_dot):
            return z * z * z_dot                   # J ż = z² ⊙ ż

        cube.defrules(cube_fwd, cube_bwd, cube_jvp)

    Args:
      fun: the primal function; its array arguments (pytrees) come first, then the
        non-differentiable ones.
      nondiff_argnames: names of the static, hashable hyper-parameters (after the arrays).
      batch_argnums: positions of array arguments whose extra leading axes ``fun``, ``fwd``,
        ``bwd`` and ``jvp`` all accept as a batch; ``jax.vmap`` over only these arguments then
        calls the rules once on the whole batch (one matrix multiply for a weight gradient).
    """

    def __init__(self, fun: Callable, nondiff_argnames: Sequence[str] = (),
                 batch_argnums: Sequence[int] = ()):
        functools.update_wrapper(self, fun)
        self.fun = fun
        self.signature = inspect.signature(fun)
        names = list(self.signature.parameters)
        unknown = set(nondiff_argnames) - set(names)
        if unknown:
            raise ValueError(f"custom_rules({fun.__name__}): nondiff_argnames {sorted(unknown)} "
                             f"are not parameters of {fun.__name__}{self.signature}")
        self.array_names = [n for n in names if n not in nondiff_argnames]
        self.nondiff_argnames = tuple(n for n in names if n in nondiff_argnames)
        if names[:len(self.array_names)] != self.array_names:
            raise ValueError(f"custom_rules({fun.__name__}): the array arguments must come "
                             f"before the non-differentiable ones {self.nondiff_argnames}")
        self.batch_argnums = tuple(batch_argnums)
        self.fwd = self.bwd = self.jvp = None

    def defrules(self, fwd: Callable, bwd: Callable, jvp: Callable) -> "custom_rules":
        """Set the forward rule (residuals), the backward (VJP) and the JVP."""
        self.fwd, self.bwd, self.jvp = fwd, bwd, jvp
        return self

    def __call__(self, *args: Any, **kwargs: Any):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        hyper = {n: bound.arguments[n] for n in self.nondiff_argnames}
        return _bind(self, [bound.arguments[n] for n in self.array_names], hyper)

    def __repr__(self):
        return f"<custom_rules {self.__name__}>"


def _bind(rules, arrays: Sequence[Any], hyper: dict):
    """``rules.fun(*arrays, **hyper)`` as one ``jbackprop_call``."""
    for n, x in hyper.items():
        try:
            hash(x)
        except TypeError:
            raise TypeError(f"{rules.__name__}: the non-differentiable argument {n} must be "
                            f"hashable (static), got {type(x).__name__}") from None
    flat, in_tree = tree_util.tree_flatten(tuple(arrays))
    batchable = tuple(ok for i, a in enumerate(arrays)
                      for ok in [i in rules.batch_argnums] * len(tree_util.tree_leaves(a)))
    static = _Static(rules, tuple(hyper.items()), in_tree, batchable)
    out_tree = jax.eval_shape(lambda *a: rules.fun(*a, **hyper), *arrays)
    outs = _call_p.bind(*flat, call=static)
    return tree_util.tree_unflatten(tree_util.tree_structure(out_tree), outs)


class _Static(Hashable):
    """The static parameter of one ``jbackprop_call``: the rules, hyper-parameters and the
    tree of the array arguments (and which leaves take leading batch axes)."""

    def __init__(self, rules, hyper, in_tree, batchable):
        self.rules, self.hyper, self.in_tree, self.batchable = rules, hyper, in_tree, batchable

    def _key(self):
        return (self.rules, self.hyper, self.in_tree, self.batchable)

    def __repr__(self):
        return getattr(self.rules, "__name__", "module")

    def arrays(self, flat):
        return tree_util.tree_unflatten(self.in_tree, flat)

    def hyper_values(self):
        return [v for _, v in self.hyper]

    def __call__(self, *flat):
        return tree_util.tree_leaves(self.rules.fun(*self.arrays(flat), **dict(self.hyper)))


# --- jbackprop_call: the function --------------------------------------------------------------
_call_p = Primitive("jbackprop_call")
_call_p.multiple_results = True


def _call_abstract_eval(*avals, call: _Static):
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type,
                                    **_explicit(a)) for a in avals]
    return [shaped_array(o, _most_varying(avals)).update(**_explicit(o))
            for o in jax.eval_shape(call, *structs)]


def _most_varying(avals):
    """Inside ``shard_map``: the input that varies along the most mesh axes (the outputs vary
    as it does; a zero-byte shape residual or a replicated parameter does not vary)."""
    return max(avals, key=lambda a: len(varying_axes_of_aval(a)), default=None)


def _explicit(aval) -> dict:
    """``{"sharding": …}`` of an abstract value typed on a mesh with Explicit axes, else ``{}``
    (the output of a module is sharded as the rules compute it, e.g. along the batch)."""
    sharding = getattr(aval, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    if mesh is None or explicit is None or explicit not in tuple(getattr(mesh, "axis_types", ())):
        return {}
    return {"sharding": sharding}


def _call_jvp(primals, tangents, *, call: _Static):
    """The hand-written forward rule now; the hand-written JVP/backward as ``jbackprop_linear``."""
    rules = call.rules
    if rules.fwd is None or rules.jvp is None or rules.bwd is None:
        raise TypeError(f"{rules.__name__} has no hand-written rules yet: call "
                        f"{rules.__name__}.defrules(fwd, bwd, jvp) before differentiating it")
    out, residuals = rules.fwd(*call.arrays(primals), **dict(call.hyper))
    out_leaves, out_tree = tree_util.tree_flatten(out)
    res_leaves, res_tree = tree_util.tree_flatten(residuals)
    outs = tuple((o.shape, o.dtype, o.aval.weak_type if hasattr(o, "aval") else False,
                  explicit_sharding(o)) for o in map(jnp.asarray, out_leaves))
    lin = _Linear(call, res_tree, out_tree, outs, ())
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return out_leaves, _lin_p.bind(*res_leaves, *tangents, lin=lin)


def _call_batch(args, dims, size, axis, *, call: _Static):
    uses_axis = names_axis(call, axis)
    if all(d is None for d in dims):
        if not uses_axis:
            outs = _call_p.bind(*args, call=call)
            return outs, [None] * len(outs)
        args, dims = broadcast_first(args, dims, size)
    if not uses_axis and all(d is None or ok for d, ok in zip(dims, call.batchable)):
        # Only arguments with leading batch axes are batched: one call on the whole batch.
        lead = [jnp.moveaxis(a, d, 0) if d is not None
                else jnp.broadcast_to(a, (size, *a.shape)) if ok else a
                for a, d, ok in zip(args, dims, call.batchable)]
        outs = _call_p.bind(*lead, call=call)
    else:  # e.g. vmap over the parameters: the rules themselves, vmapped
        axes = tuple(None if d is None else 0 for d in dims)
        moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
        batched = _Static(Vmapped(call, axes, axis), (), call.in_tree, (False,) * len(args))
        outs = _call_p.bind(*moved, call=batched)
    return outs, [0] * len(outs)


_call_p.def_impl(lambda *flat, call: call(*flat))
_call_p.def_abstract_eval(_call_abstract_eval)
ad.primitive_jvps[_call_p] = _call_jvp
def_batcher(_call_p, _call_batch)
mlir.register_lowering(_call_p, mlir.lower_fun(lambda *f, call: call(*f), multiple_results=True))


# --- jbackprop_linear: the tangent map, J ż by the JVP rule, Jᵀ v by the backward --------------
class _Linear(Hashable):
    """The static parameter of one ``jbackprop_linear``: the call it linearises, the trees of
    its residuals and output, the output's (shape, dtype)s, and ``levels``: one
    ``(residual axes, tangent axes, size, axis)`` per ``jax.vmap`` around it (axes 0 or None per
    leaf; ``axis`` the vmap's ``(axis_name, spmd_axis_name)``), innermost first."""

    def __init__(self, call, res_tree, out_tree, outs, levels):
        self.call, self.res_tree, self.out_tree = call, res_tree, out_tree
        self.outs, self.levels = outs, levels

    def _key(self):
        return (self.call, self.res_tree, self.out_tree, self.outs, self.levels)

    def __repr__(self):
        return f"J[{self.call!r}]" + "".join(f"vmap{level[2]}" for level in self.levels)

    @property
    def num_res(self):
        return self.res_tree.num_leaves

    def split(self, flat):
        return list(flat[:self.num_res]), list(flat[self.num_res:])

    def inner(self):
        """The same map one ``jax.vmap`` level in."""
        return _Linear(self.call, self.res_tree, self.out_tree, self.outs, self.levels[:-1])

    def shapes(self):
        """The output's (shape, dtype)s with every batch level."""
        sizes = tuple(level[2] for level in reversed(self.levels))
        return [((*sizes, *s), d, weak, None if sizes else sharding)
                for s, d, weak, sharding in self.outs]

    def tangent(self, res, dots):
        """``J ż``: the hand-written JVP, vmapped once per level."""
        if self.levels:
            res_axes, dot_axes, _, axis = self.levels[-1]
            return vmap_under(self.inner().tangent, (list(res_axes), list(dot_axes)), axis)(res, dots)
        call = self.call
        out_dot = call.rules.jvp(*call.hyper_values(), self.res_tree.unflatten(res),
                                 *call.arrays(dots))
        leaves = _checked(call.rules, "jvp", "output's", tree_util.tree_leaves(out_dot), self.outs)
        return [weakly_typed(t) if out[2] else t for t, out in zip(leaves, self.outs)]

    def cotangent(self, res, v):
        """``Jᵀ v``: the hand-written backward, vmapped once per level (the cotangent of an
        unbatched tangent summed over the batch: the transpose of its broadcast)."""
        if self.levels:
            res_axes, dot_axes, _, axis = self.levels[-1]
            cts = vmap_under(self.inner().cotangent, (list(res_axes), 0), axis)(res, v)
            return [ct if ct is None or d == 0 else ct.sum(0) for ct, d in zip(cts, dot_axes)]
        call = self.call
        return flat_cotangents(call, call.rules.bwd(*call.hyper_values(),
                                                     self.res_tree.unflatten(res),
                                                     self.out_tree.unflatten(v)))


def _checked(rules, rule, what, leaves, expected):
    """``leaves`` must have the ``expected`` ``(shape, dtype, …)``s (weak types aside)."""
    if len(leaves) != len(expected) or any(
            jnp.shape(x) != e[0] or jnp.result_type(x) != e[1] for x, e in zip(leaves, expected)):
        got = [(jnp.shape(x), str(jnp.result_type(x))) for x in leaves]
        raise TypeError(f"{rules.__name__}: the hand-written {rule} must return the {what} "
                        f"shapes and dtypes {[(e[0], str(e[1])) for e in expected]}, got {got}")
    return leaves


_lin_p = Primitive("jbackprop_linear")
_lin_p.multiple_results = True


def _lin_abstract_eval(*avals, lin: _Linear):
    like = _most_varying(avals)
    avals = [(shaped_array(jax.ShapeDtypeStruct(s, d, weak_type=weak), like), sharding)
             for s, d, weak, sharding in lin.shapes()]
    # on a mesh with Explicit axes: the tangent is sharded as the output (``_call_jvp``)
    return [a if sharding is None else a.update(sharding=sharding) for a, sharding in avals]


def _lin_transpose(cts, *args, lin: _Linear):
    res, dots = lin.split(args)
    if any(ad.is_undefined_primal(r) for r in res):
        raise NotImplementedError("jbackprop_linear is linear in its tangents only")
    bars = lin.cotangent(res, [ad.instantiate_zeros(ct) for ct in cts])
    pairs = [(b, d) for b, d in zip(bars, dots) if b is not None and ad.is_undefined_primal(d)]
    _checked(lin.call.rules, "backward", "arguments'", [b for b, _ in pairs],
             [(d.aval.shape, d.aval.dtype) for _, d in pairs])
    return [None] * len(res) + [
        None if b is None or not ad.is_undefined_primal(d)
        else weakly_typed(b) if d.aval.weak_type else b for b, d in zip(bars, dots)]


def _lin_jvp(primals, tangents, *, lin: _Linear):
    """Second order: linear in the tangent inputs (the hand-written JVP again); the derivative
    with respect to the residuals is JAX's derivative of the JVP rule's arithmetic."""
    res, dots = lin.split(primals)
    res_dots, dot_dots = lin.split(tangents)
    out = _lin_p.bind(*primals, lin=lin)
    out_dot = _lin_p.bind(*res, *[ad.instantiate_zeros(t) for t in dot_dots], lin=lin)
    if not all(type(t) is ad.Zero for t in res_dots):
        res_dots = [ad.instantiate_zeros(t) for t in res_dots]
        _, by_res = jax.jvp(lambda r: lin.tangent(r, dots), (res,), (res_dots,))
        out_dot = [a + b for a, b in zip(out_dot, by_res)]
    return out, out_dot


def _lin_batch(args, dims, size, axis, *, lin: _Linear):
    if all(d is None for d in dims):
        if not names_axis(lin.call, axis):
            outs = _lin_p.bind(*args, lin=lin)
            return outs, [None] * len(outs)
        args, dims = broadcast_first(args, dims, size)
    res_dims, dot_dims = lin.split(dims)
    moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    level = (tuple(None if d is None else 0 for d in res_dims),
             tuple(None if d is None else 0 for d in dot_dims), size, axis)
    batched = _Linear(lin.call, lin.res_tree, lin.out_tree, lin.outs, (*lin.levels, level))
    outs = _lin_p.bind(*moved, lin=batched)
    return outs, [0] * len(outs)


def _lin_impl(*flat, lin: _Linear):
    return lin.tangent(*lin.split(flat))


_lin_p.def_impl(_lin_impl)
_lin_p.def_abstract_eval(_lin_abstract_eval)
ad.primitive_jvps[_lin_p] = _lin_jvp
ad.primitive_transposes[_lin_p] = _lin_transpose
def_batcher(_lin_p, _lin_batch)
mlir.register_lowering(_lin_p, mlir.lower_fun(_lin_impl, multiple_results=True))

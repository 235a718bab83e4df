"""The hand-written rules of a ``jb.custom_rules`` function, batched by ``jax.vmap``.

When ``jax.vmap`` maps an argument that the rules do not take with leading batch axes (the
parameters, for per-example gradients), or maps ``jbackprop_linear``, the hand-written rules
themselves are vmapped: ``Vmapped`` holds them, and ``vmap_under`` re-binds the ``axis_name``
(and ``spmd_axis_name``) of the user's ``jax.vmap``, so that a collective in a rule —
``batch_norm``'s ``lax.pmean(…, axis_name)`` — reduces over the user's batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import tree_util

__all__ = ["Hashable", "Vmapped", "broadcast_first", "flat_cotangents", "names_axis",
           "vmap_under"]


class Hashable:
    """Hashable by the tuple ``_key()``: the static parameter of a primitive."""

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return type(other) is type(self) and self._key() == other._key()


def flat_cotangents(call, bars) -> list:
    """The backward's tuple of cotangents (one pytree or ``None`` per array argument) as one
    list per leaf of the arguments (``None``: no cotangent, e.g. an integer label)."""
    trees = [tree_util.tree_structure(a) for a in call.arrays([0] * call.in_tree.num_leaves)]
    if not isinstance(bars, (tuple, list)) or len(bars) != len(trees):
        raise TypeError(f"{call.rules.__name__}: the backward must return a tuple of "
                        f"{len(trees)} cotangent(s), one per array argument; got "
                        f"{type(bars).__name__}")
    return [ct for bar, tree in zip(bars, trees)
            for ct in (tree.flatten_up_to(bar) if bar is not None else [None] * tree.num_leaves)]


def vmap_under(fn, in_axes, axis):
    """``jax.vmap(fn)`` under the user's vmap's ``axis = (axis_name, spmd_axis_name)``."""
    return jax.vmap(fn, in_axes=in_axes, axis_name=axis[0], spmd_axis_name=axis[1])


def names_axis(call, axis) -> bool:
    """Whether a hyper-parameter of ``call`` (or of the call it vmaps) is the vmap's name."""
    inner = call.rules.base if isinstance(call.rules, Vmapped) else None
    return axis[0] is not None and (axis[0] in call.hyper_values()
                                    or (inner is not None and names_axis(inner, axis)))


def broadcast_first(args, dims, size):
    """Nothing batched, but the rules reduce over the named axis: batch the first argument."""
    return [jnp.broadcast_to(args[0], (size, *jnp.shape(args[0]))), *args[1:]], [0, *dims[1:]]


class Vmapped(Hashable):
    """The rules of ``call`` batched by ``jax.vmap`` over ``axes`` (0 or None per leaf), under
    the name and ``spmd_axis_name`` ``axis`` of the user's vmap."""

    def __init__(self, call, axes: tuple, axis: tuple = (None, None)):
        self.base, self.axes, self.axis = call, axes, axis
        self.__name__ = f"vmap({call.rules.__name__})"
        self.batch_argnums = ()

    def _key(self):
        return (self.base, self.axes, self.axis)

    def fun(self, *arrays):
        flat = tree_util.tree_leaves(arrays)
        return vmap_under(lambda f: self.base(*f), (list(self.axes),), self.axis)(flat)

    def fwd(self, *arrays):
        base = self.base

        def one(flat):
            return base.rules.fwd(*base.arrays(flat), **dict(base.hyper))
        return vmap_under(one, (list(self.axes),), self.axis)(tree_util.tree_leaves(arrays))

    def jvp(self, residuals, *dots):
        base = self.base

        def one(res, flat_dots):
            return base.rules.jvp(*base.hyper_values(), res, *base.arrays(flat_dots))
        flat_dots = tree_util.tree_leaves(dots)
        return vmap_under(one, (0, list(self.axes)), self.axis)(residuals, flat_dots)

    def bwd(self, residuals, v):
        base = self.base

        def one(res, v):
            return flat_cotangents(base, base.rules.bwd(*base.hyper_values(), res, v))
        flat = vmap_under(one, 0, self.axis)(residuals, v)
        flat = [ct if ct is None or a == 0 else ct.sum(0) for ct, a in zip(flat, self.axes)]
        return base.arrays(flat)

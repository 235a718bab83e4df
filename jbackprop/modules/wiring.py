"""How a module is wired into JAX: its core, the casts before it, and the notes' form.

Every module of jbackprop has a *core* (e.g. ``_mm``), a ``custom_rules`` function
(``jbackprop.modules.rules``) whose ``fwd`` saves residuals, whose ``bwd`` is the hand-written
backward B[M, z], B[M, θ] and whose ``jvp`` is the hand-written tangent map J_M ż. The public
function (``mm``) checks its arguments, casts them to their common dtype, and returns
``apply(core, *arrays, **hyper)``: a reader follows ``mm`` to ``_mm`` in one line.

Why the cast comes first. The casts are ordinary JAX operations *outside* the core, so
``jax.grad`` transposes them: a float32 ``W`` used with a float64 ``z`` gets a float32 ``W_bar``,
exactly as ``jax.grad`` of the plain ``jnp`` code returns. Inside, the core sees one dtype.

Batching. A per-example MM whose backward is ``v zᵀ`` becomes, under ``jax.vmap``, a batch of
outer products that JAX then sums: a broadcast multiply and a reduction instead of one matrix
multiply. A core declared with ``batch_argnums`` is therefore called once on the whole batch
(the batch as leading axes; its rules contract over them), so the weight gradient is one
``dot_general``, exactly as autodiff would do; ``jax.vmap(jax.grad(f))`` (per-example
gradients) differentiates one example first and batches afterwards (``docs/batching.md``).

The notes' form. ``M.linearize(*args)`` runs the public function once with the core's forward
rule in place of the core (``apply`` sees a recorder and calls ``fwd`` instead), so the same
argument checks and casts apply, and returns the output and a ``Linearized``: the residuals
with the two hand-written rules. ``M.backward(*args, v)`` and ``M.tangent(*args, *dots)`` apply
them.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import tree_util

from jbackprop._compat import explicit_sharding, mark_varying, varying_axes
from jbackprop.modules.rules import custom_rules

class _Recorder:
    """Set by ``M.linearize``: the next ``apply`` runs the core's forward rule and keeps the
    residuals (with the core's two rules: a ``Linearized``)."""

    def __init__(self):
        self.armed, self.linearized, self.count = True, None, 0


_RECORDERS: list[_Recorder] = []


@tree_util.register_pytree_node_class
class Linearized:
    """A module linearised at a point: the residuals of its forward rule, with the hand-written
    backward (``pullback(v)``, B[M, ·](v)) and JVP (``pushforward(*dots)``, J_M ż) on them.

    A pytree whose leaves are the residuals, so that a composite module's forward rule can keep
    it as a residual of its own (the residual block keeps MM's)."""

    def __init__(self, core: custom_rules, hyper_values: tuple, residuals: Any):
        self.core, self.hyper_values, self.residuals = core, tuple(hyper_values), residuals

    def tree_flatten(self):
        return (self.residuals,), (self.core, self.hyper_values)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*aux, *children)

    def pullback(self, v) -> tuple:
        """B[M, ·](v): the cotangents of the array arguments, in order."""
        return self.core.bwd(*self.hyper_values, self.residuals, v)

    def pushforward(self, *dots):
        """J_M ż: the output's tangent for one tangent per array argument."""
        return self.core.jvp(*self.hyper_values, self.residuals, *dots)


def apply(core: custom_rules, *arrays: Any, **hyper: Any):
    """Run the core of a module (a ``custom_rules`` function) on its checked arrays.

    Args:
      core: the module's core, with its hand-written ``fwd``, ``bwd`` and ``jvp``; its
        non-differentiable arguments (``nondiff_argnames``) are the hyper-parameters.
      *arrays: the array arguments (pytrees), already checked and cast to one dtype.
      **hyper: the static hyper-parameters.
    """
    arrays = _same_varying_axes(arrays)
    if _RECORDERS and _RECORDERS[-1].armed:         # inside M.linearize: the forward rule
        rec = _RECORDERS[-1]
        rec.armed, rec.count = False, rec.count + 1
        out, residuals = core.fwd(*arrays, **hyper)
        rec.linearized = Linearized(core, [hyper[n] for n in core.nondiff_argnames], residuals)
        return out
    return core(*arrays, **hyper)


def _same_varying_axes(arrays):
    """Inside ``jax.shard_map``: every array cast to vary along the union of the mesh axes the
    arrays vary along (a replicated ``W`` used with a batch-sharded ``z``).

    A ``custom_vjp`` backward must return each cotangent with its primal's type, and the
    hand-written ``B[M, W](v) = v zᵀ`` of a sharded ``z`` varies along the batch axis while the
    replicated ``W`` does not ("bwd rule produced … {V:data}"). With the cast done here, outside
    the core, the core sees one varying type, and JAX transposes the cast into the ``psum``
    over the devices that a replicated parameter's cotangent needs: the rule stays per-device
    and unchanged, the reduction is JAX's own. Outside ``shard_map`` this is the identity."""
    leaves, tree = tree_util.tree_flatten(arrays)
    union = frozenset().union(*(varying_axes(x) for x in leaves)) if leaves else frozenset()
    if not union:
        return arrays
    leaves = [x if varying_axes(x) >= union else
              mark_varying(x, tuple(sorted(union - varying_axes(x)))) for x in leaves]
    return tree_util.tree_unflatten(tree, leaves)


def sum_over_batch(v, z, batch: tuple, like):
    """``Σ_batch v ⊗ z``: ``jnp.tensordot(v, z, (batch, batch))``, the contraction of a weight
    gradient over the leading (batch) axes, typed like the weight ``like``.

    On a mesh with ``AxisType.Explicit`` axes the batch axes are sharded, and JAX asks the
    contraction for its output sharding ("contracting dimensions are sharded and it is ambiguous
    how the output should be sharded"): it is the weight's own (replicated, or split over
    ``"model"``), which is also what ``jax.grad`` of the plain code gives. Elsewhere this is
    ``jnp.tensordot``."""
    if explicit_sharding(like) is None:
        return jnp.tensordot(v, z, axes=(batch, batch))
    return jax.lax.dot_general(v, z, ((batch, batch), ((), ())), **sharded_like(like))


def sharded_like(like, trailing: int = 0) -> dict:
    """``{"out_sharding": like's sharding}`` on a mesh with ``AxisType.Explicit`` axes, else
    ``{}``: keyword arguments for a contraction over the (sharded) batch axes whose result is a
    weight's gradient (``sum_over_batch``; the convolutions' ``w̄``), or for a gather or scatter
    whose result is laid out as ``like`` (the poolings' ``z̄``; ``embedding``'s rows, with
    ``trailing`` unsharded axes after ``like``'s)."""
    sharding = explicit_sharding(like)
    if sharding is None:
        return {}
    if trailing:
        spec = tuple(sharding.spec) + (None,) * (jnp.ndim(like) - len(sharding.spec) + trailing)
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return {"out_sharding": sharding}


def _shape_text(tree) -> str:
    return str(jax.tree.map(lambda a: f"{jnp.shape(a)} {jnp.result_type(a)}", tree))


def _check_like(name: str, given_name: str, what: str, given, of: str, like) -> None:
    """``given`` (``what``) must have the tree and shapes of ``like`` (``of``), and floating
    leaves."""
    if jax.tree.structure(given) != jax.tree.structure(like) or any(
            jnp.shape(a) != jnp.shape(b) for a, b in zip(jax.tree.leaves(given), jax.tree.leaves(like))):
        raise ValueError(f"{name}: {what} must have the shape of {of}, {_shape_text(like)}; "
                         f"got {given_name} {_shape_text(given)}")
    for a in jax.tree.leaves(given):
        if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise TypeError(f"{name}: {given_name} must be floating-point, got dtype "
                            f"{jnp.result_type(a)}")


def _pullback(name: str, out, primal_dtypes, lin: Linearized, v):
    """The hand-written backward on a checked ``v``; cotangents cast to their primals' dtypes.

    ``out`` holds the output's shapes and dtypes (``jax.ShapeDtypeStruct``); ``primal_dtypes``
    the array arguments' dtypes, ``None`` for integer labels (whose cotangent is ``None``)."""
    _check_like(name, "v", "v (the upstream gradient)", v, "the module's output", out)
    cts = lin.pullback(jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), v, out))
    return tuple(None if c is None else jax.tree.map(
        lambda c, d: c if c is None or d is None else jnp.asarray(c, d), c, d,
        is_leaf=lambda x: x is None) for c, d in zip(cts, primal_dtypes))


def _dtype_or_none(x):
    dtype = jnp.result_type(x)
    return dtype if jnp.issubdtype(dtype, jnp.inexact) else None


def attach(fn: Callable, core: custom_rules, num_arrays: int) -> None:
    """Give the public module ``fn`` its notes-form rules and ``fn.core``.

    * ``fn.linearize(*args, **kwargs) -> (out, Linearized)``: the forward pass by the core's
      forward rule, and the residuals with both hand-written rules on them.
    * ``fn.vjp(*args, **kwargs) -> (out, pullback)``: ``pullback(v)`` is the hand-written
      backward on the residuals.
    * ``fn.backward(*arrays, v, **hyper)``: B[M, ·](v) in the notes' form — the array arguments,
      then the upstream ``v`` (positional or keyword), hyper-parameters by keyword. Returns the
      tuple of cotangents of the array arguments (``(params_bar, z_bar)``, or ``(z_bar,)``),
      each in its argument's dtype; ``v`` must have the output's shape (``ValueError``).
    * ``fn.tangent(*arrays, *dots, **hyper)``: J_M ż in the same form — the array arguments,
      then one tangent per array argument (of its shape; ``None`` for an integer label),
      hyper-parameters by keyword. Returns the output's tangent, in the output's dtype.
    """
    signature = inspect.signature(fn)
    array_names = list(signature.parameters)[:num_arrays]

    def linearize(*args, **kwargs):
        rec = _Recorder()
        _RECORDERS.append(rec)
        try:
            out = fn(*args, **kwargs)
        finally:
            _RECORDERS.pop()
        if rec.count != 1:
            raise TypeError(f"{fn.__name__}.linearize: the module ran {rec.count} hand-written "
                            "rules; it must run exactly one")
        return out, rec.linearized

    def vjp(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        primals = [bound.arguments[n] for n in array_names]
        out, lin = linearize(*args, **kwargs)
        # A pytree (the residuals are its leaves), so that a composite module's forward rule
        # can keep it as a residual of its own.
        structs = jax.tree.map(lambda o: jax.ShapeDtypeStruct(jnp.shape(o), jnp.result_type(o)), out)
        dtypes = [jax.tree.map(_dtype_or_none, p) for p in primals]
        return out, tree_util.Partial(
            functools.partial(_pullback, f"{fn.__name__}.backward", structs, dtypes), lin)

    def backward(*args, **kwargs):
        if "v" in kwargs:
            v = kwargs.pop("v")
        elif args:
            *args, v = args
        else:
            raise TypeError(f"{fn.__name__}.backward needs the upstream gradient v")
        return vjp(*args, **kwargs)[1](v)

    def tangent(*args, **kwargs):
        name = f"{fn.__name__}.tangent"
        if len(args) != 2 * num_arrays:
            raise TypeError(f"{name} takes the {num_arrays} array argument(s) "
                            f"{', '.join(array_names)} and then one tangent for each "
                            f"({2 * num_arrays} positional arguments), got {len(args)}")
        primals, dots = args[:num_arrays], args[num_arrays:]
        out, lin = linearize(*primals, **kwargs)
        checked = []
        for n, p, d in zip(array_names, primals, dots):
            if _dtype_or_none(jax.tree.leaves(p)[0]) is None:   # an integer label: no tangent
                checked.append(None)
                continue
            _check_like(name, f"{n}_dot", f"{n}_dot (the tangent of {n})", d, n, p)
            checked.append(jax.tree.map(lambda d, p: jnp.asarray(d, jnp.result_type(p)), d, p))
        dtype = jax.tree.map(jnp.result_type, out)
        return jax.tree.map(lambda t, d: jnp.asarray(t, d), lin.pushforward(*checked), dtype)

    fn.linearize, fn.vjp, fn.backward, fn.tangent, fn.core = linearize, vjp, backward, tangent, core


def _module_attribute(m: Callable, attribute: str, what: str) -> Callable:
    try:
        return getattr(m, attribute)
    except AttributeError:
        raise TypeError(f"{attribute}: {m!r} is not a jbackprop module (it has no hand-written "
                        f"{what}); pass one of jb.mm, jb.relu, ...") from None


def backward(m: Callable) -> Callable:
    """The hand-written backward of module ``m`` in the notes' form.

    ``jb.backward(jb.mm)(params, z, v)`` returns ``(B[MM, θ](v), B[MM, z](v))``, the cotangents
    of the array arguments in order, computed by the module's ``bwd`` without any autodiff.
    """
    return _module_attribute(m, "backward", "backward")


def tangent(m: Callable) -> Callable:
    """The hand-written JVP of module ``m`` in the notes' form, the twin of ``backward``.

    ``jb.tangent(jb.mm)(params, z, params_dot, z_dot)`` returns ``J_MM ż = W ż + Ẇ z + ḃ``,
    computed by the module's ``jvp`` without any autodiff (a tangent per array argument, of its
    shape; ``None`` for an integer label).
    """
    return _module_attribute(m, "tangent", "JVP")

"""How a module is wired into JAX: ``custom_vjp`` for the backward, a dispatch for ``vmap``.

Every module of jbackprop is a ``jax.custom_vjp`` function (the *core*, e.g. ``_mm``) whose
``_fwd`` saves residuals and whose ``_bwd`` is the hand-written backward B[M, z], B[M, θ]. The
public function (``mm``) checks its arguments, casts them to their common dtype, and returns
``apply(core, *arrays, **hyper)``: a reader follows ``mm`` to ``_mm`` in one line.

Why the cast comes first. The casts are ordinary JAX operations *outside* the core, so
``jax.grad`` transposes them: a float32 ``W`` used with a float64 ``z`` gets a float32 ``W_bar``,
exactly as ``jax.grad`` of the plain ``jnp`` code returns. Inside, the core sees one dtype.

Batching design. A per-example MM whose backward is ``v zᵀ`` becomes, under ``jax.vmap``, a
batch of outer products that JAX then sums over the batch: a broadcast multiply and a reduction
instead of one matrix multiply. For modules with weights ``apply`` therefore binds a small
primitive, ``jbackprop_call``, around the core:

* evaluated or compiled, it simply runs the core (a ``custom_vjp``);
* under ``jax.vmap`` (its batching rule) it calls the *same* core once on the whole batch,
  with the batch as a leading axis; the core's backward contracts over leading axes, so the
  weight gradient is one matrix multiply (``dot_general``), exactly as autodiff would do;
* under ``jax.grad`` / ``jax.vjp`` (its JVP rule) it differentiates the core, that is, it runs
  the hand-written ``_fwd`` and ``_bwd``. So ``jax.vmap(jax.grad(f))`` (per-example gradients)
  differentiates one example first and batches afterwards, and stays correct.

``jax.custom_batching.custom_vmap`` almost does this, but its JVP rule binds primal and tangent
together, which ``jax.grad`` cannot linearise ("Linearization failed to produce known values").

The notes' form. ``M.vjp(*args)`` runs the public function once with the core's forward rule in
place of the core (``apply`` sees a recorder and calls ``_fwd`` instead), so the same argument
checks and casts apply, and returns the output and the hand-written ``_bwd`` on the saved
residuals. ``M.backward(*args, v)`` is its pullback applied to ``v``.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import tree_util

from jbackprop._compat import (Primitive, ad, batching, custom_vjp_rules, explicit_sharding,
                               mark_varying, mlir, shaped_array, varying_axes)

_call_p = Primitive("jbackprop_call")
_call_p.multiple_results = True


class _Static:
    """Hashable bundle of the non-array parameters of one ``jbackprop_call``."""

    def __init__(self, core, static_kwargs, in_tree, batchable):
        self.core, self.static_kwargs = core, static_kwargs
        self.in_tree, self.batchable = in_tree, batchable

    def _key(self):
        return (self.core, self.static_kwargs, self.in_tree, self.batchable)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key() == other._key()

    def __repr__(self):
        return getattr(self.core, "__name__", "module")

    def __call__(self, *flat):
        args = tree_util.tree_unflatten(self.in_tree, flat)
        return tree_util.tree_leaves(self.core(*args, **dict(self.static_kwargs)))


def _impl(*flat, call: _Static):
    return call(*flat)


def _abstract_eval(*avals, call: _Static):
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in avals]
    # inside shard_map the core's arrays vary along the same axes (``_same_varying_axes``)
    return [shaped_array(o, avals[0] if avals else None) for o in jax.eval_shape(call, *structs)]


def _jvp(primals, tangents, *, call: _Static):
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return jax.jvp(call, tuple(primals), tuple(tangents))


def _batch(args, dims, *, call: _Static):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    if all(d is None or ok for d, ok in zip(dims, call.batchable)):
        # Only data arguments are batched: the core takes the batch as a leading axis.
        lead = [jnp.moveaxis(a, d, 0) if d is not None
                else jnp.broadcast_to(a, (size, *a.shape)) if ok else a
                for a, d, ok in zip(args, dims, call.batchable)]
        outs = _call_p.bind(*lead, call=call)
    else:  # e.g. vmap over parameters: JAX's own batching of the custom_vjp core
        outs = jax.vmap(call, in_axes=tuple(dims))(*args)
    return outs, [0] * len(outs)


_call_p.def_impl(_impl)
_call_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[_call_p] = _jvp
batching.primitive_batchers[_call_p] = _batch
mlir.register_lowering(_call_p, mlir.lower_fun(_impl, multiple_results=True))


class _Recorder:
    """Set by ``vjp``: the next ``apply`` runs the core's forward rule and keeps its pullback."""

    def __init__(self):
        self.armed, self.pullback, self.count = True, None, 0


_RECORDERS: list[_Recorder] = []


def apply(core: Callable, *arrays: Any, batch_argnums: Sequence[int] = (), **hyper: Any):
    """Run the ``custom_vjp`` core of a module on its checked arrays.

    Args:
      core: the module's ``jax.custom_vjp`` function; its non-differentiable arguments
        (``nondiff_argnames``) are the hyper-parameters and come after the arrays.
      *arrays: the array arguments (pytrees), already checked and cast to one dtype.
      batch_argnums: positions of the arrays that accept extra leading batch axes; if given,
        ``jax.vmap`` of the module runs the core once on the whole batch (module docstring).
      **hyper: the static hyper-parameters.
    """
    arrays = _same_varying_axes(arrays)
    if _RECORDERS and _RECORDERS[-1].armed:         # inside M.vjp: the forward rule, by hand
        rec = _RECORDERS[-1]
        rec.armed, rec.count = False, rec.count + 1
        fwd, bwd, nondiff, names = custom_vjp_rules(core)
        out, residuals = fwd(*arrays, **hyper)
        # custom_vjp passes the non-differentiable (static) arguments to bwd first, in order.
        rec.pullback = tree_util.Partial(
            functools.partial(bwd, *[hyper[names[i]] for i in nondiff]), residuals)
        return out
    if not batch_argnums:
        return core(*arrays, **hyper)
    flat, in_tree = tree_util.tree_flatten(tuple(arrays))
    batchable = tuple(ok for i, a in enumerate(arrays)
                      for ok in [i in batch_argnums] * len(tree_util.tree_leaves(a)))
    call = _Static(core, tuple(sorted(hyper.items())), in_tree, batchable)
    out_tree = jax.eval_shape(lambda *a: core(*a, **hyper), *arrays)
    outs = _call_p.bind(*flat, call=call)
    return tree_util.tree_unflatten(tree_util.tree_structure(out_tree), outs)


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


def sharded_like(like) -> dict:
    """``{"out_sharding": like's sharding}`` on a mesh with ``AxisType.Explicit`` axes, else
    ``{}``: keyword arguments for a contraction over the (sharded) batch axes whose result is a
    weight's gradient (``sum_over_batch``; the convolutions' ``w̄``)."""
    sharding = explicit_sharding(like)
    return {} if sharding is None else {"out_sharding": sharding}


def _shape_text(tree) -> str:
    return str(jax.tree.map(lambda a: f"{jnp.shape(a)} {jnp.result_type(a)}", tree))


def _pullback(name: str, out, primal_dtypes, bwd, v):
    """The hand-written ``bwd`` on a checked ``v``; cotangents cast to their primals' dtypes.

    ``out`` holds the output's shapes and dtypes (``jax.ShapeDtypeStruct``); ``primal_dtypes``
    the array arguments' dtypes, ``None`` for integer labels (whose cotangent is ``None``)."""
    if jax.tree.structure(v) != jax.tree.structure(out) or any(
            jnp.shape(a) != b.shape for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(out))):
        raise ValueError(f"{name}: v (the upstream gradient) must have the shape of the module's "
                         f"output, {_shape_text(out)}; got v {_shape_text(v)}")
    for a in jax.tree.leaves(v):
        if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise TypeError(f"{name}: v must be floating-point, got dtype {jnp.result_type(a)}")
    cts = bwd(jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), v, out))
    return tuple(None if c is None else jax.tree.map(
        lambda c, d: c if c is None or d is None else jnp.asarray(c, d), c, d,
        is_leaf=lambda x: x is None) for c, d in zip(cts, primal_dtypes))


def _dtype_or_none(x):
    dtype = jnp.result_type(x)
    return dtype if jnp.issubdtype(dtype, jnp.inexact) else None


def attach(fn: Callable, core: Callable, num_arrays: int) -> None:
    """Give the public module ``fn`` its notes-form ``fn.vjp`` and ``fn.backward`` and ``fn.core``.

    * ``fn.vjp(*args, **kwargs) -> (out, pullback)``: the forward pass with the residuals of
      ``_fwd``, and ``pullback(v)``, the hand-written backward (``_bwd``) on them.
    * ``fn.backward(*arrays, v, **hyper)``: B[M, ·](v) in the notes' form — the array arguments,
      then the upstream ``v`` (positional or keyword), hyper-parameters by keyword. Returns the
      tuple of cotangents of the array arguments (``(params_bar, z_bar)``, or ``(z_bar,)``),
      each in its argument's dtype; ``v`` must have the output's shape (``ValueError``).
    """
    signature = inspect.signature(fn)
    array_names = list(signature.parameters)[:num_arrays]

    def vjp(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        primals = [bound.arguments[n] for n in array_names]
        rec = _Recorder()
        _RECORDERS.append(rec)
        try:
            out = fn(*args, **kwargs)
        finally:
            _RECORDERS.pop()
        if rec.count != 1:
            raise TypeError(f"{fn.__name__}.vjp: the module ran {rec.count} hand-written rules; "
                            "it must run exactly one")

        # A pytree (the residuals are its leaves), so that a composite module's forward rule
        # can keep it as a residual of its own (the residual block keeps MM's pullbacks).
        structs = jax.tree.map(lambda o: jax.ShapeDtypeStruct(jnp.shape(o), jnp.result_type(o)), out)
        dtypes = [jax.tree.map(_dtype_or_none, p) for p in primals]
        return out, tree_util.Partial(
            functools.partial(_pullback, f"{fn.__name__}.backward", structs, dtypes), rec.pullback)

    def backward(*args, **kwargs):
        if "v" in kwargs:
            v = kwargs.pop("v")
        elif args:
            *args, v = args
        else:
            raise TypeError(f"{fn.__name__}.backward needs the upstream gradient v")
        return vjp(*args, **kwargs)[1](v)

    fn.vjp, fn.backward, fn.core = vjp, backward, core


def backward(m: Callable) -> Callable:
    """The hand-written backward of module ``m`` in the notes' form.

    ``jb.backward(jb.mm)(params, z, v)`` returns ``(B[MM, θ](v), B[MM, z](v))``, the cotangents
    of the array arguments in order, computed by the module's ``_bwd`` without any autodiff.
    """
    try:
        return m.backward
    except AttributeError:
        raise TypeError(f"backward: {m!r} is not a jbackprop module (it has no hand-written "
                        "backward); pass one of jb.mm, jb.relu, ...") from None

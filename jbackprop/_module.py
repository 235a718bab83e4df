"""How a module is wired into JAX: ``custom_vjp`` for the backward, a dispatch for ``vmap``.

Every module of jbackprop is a ``jax.custom_vjp`` function (the *core*) whose ``_fwd`` saves
residuals and whose ``_bwd`` is the hand-written backward B[M, z], B[M, θ]. The public function
that users call validates its arguments (at trace time) and then calls the core.

Batching design. A per-example MM whose backward is ``v zᵀ`` becomes, under ``jax.vmap``, a
batch of outer products that JAX then sums over the batch: a broadcast multiply and a reduction
instead of one matrix multiply. For modules with weights the public function therefore binds a
small primitive, ``jbackprop_call``, around the core:

* evaluated or compiled, it simply runs the core (a ``custom_vjp``);
* under ``jax.vmap`` (its batching rule) it calls the *same* core once on the whole batch,
  with the batch as a leading axis; the core's backward contracts over leading axes, so the
  weight gradient is one matrix multiply (``dot_general``), exactly as autodiff would do;
* under ``jax.grad`` / ``jax.vjp`` (its JVP rule) it differentiates the core, that is, it runs
  the hand-written ``_fwd`` and ``_bwd``. So ``jax.vmap(jax.grad(f))`` (per-example gradients)
  differentiates one example first and batches afterwards, and stays correct.

``jax.custom_batching.custom_vmap`` almost does this, but its JVP rule binds primal and tangent
together, which ``jax.grad`` cannot linearise ("Linearization failed to produce known values").
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import tree_util
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

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
    outs = jax.eval_shape(call, *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals])
    return [jax.core.ShapedArray(o.shape, o.dtype) for o in outs]


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


def module(core: Callable, *, batch_args: Sequence[str] = (), static_args: Sequence[str] = ()):
    """Make a public module from a ``custom_vjp`` core and an argument-checking function.

    The decorated function has the public signature and docstring; it validates its arguments
    and returns them as a dict ready for ``core``. The result is the public module with:

    * ``module(*args, **kwargs)``: the forward pass.
    * ``module.vjp(*args, **kwargs) -> (out, pullback)``: the forward pass with the residuals
      of ``_fwd``, and ``pullback(v)``, the hand-written backward (``_bwd``) on them.
    * ``module.backward(*arrays, v, **hyper)``: B[M, ·](v) in the notes' form — the array
      arguments, then the upstream ``v`` (positional or keyword), hyper-parameters by keyword.
      Returns the tuple of cotangents of the array arguments (``(params_bar, z_bar)``, or
      ``(z_bar,)``).

    Args:
      core: the ``jax.custom_vjp`` function (its ``fwd``/``bwd`` are read from it); its
        hyper-parameters are ``nondiff_argnames`` and come after the arrays.
      batch_args: names of array arguments that accept extra leading batch axes; if given,
        ``jax.vmap`` of the module runs the core once on the batch (see module docstring).
      static_args: names of hyper-parameters, passed to ``core`` by keyword and static.
    """

    def decorate(check: Callable[..., dict]) -> Callable:
        sig = inspect.signature(check)
        names = [n for n in sig.parameters if n not in static_args]

        def split(args, kwargs):
            checked = check(*args, **kwargs)
            return [checked[n] for n in names], {k: checked[k] for k in static_args}

        @functools.wraps(check)
        def apply(*args, **kwargs):
            arrays, static = split(args, kwargs)
            if not batch_args:
                return core(*arrays, **static)
            flat, in_tree = tree_util.tree_flatten(tuple(arrays))
            batchable = tuple(ok for n, a in zip(names, arrays)
                              for ok in [n in batch_args] * len(tree_util.tree_leaves(a)))
            call = _Static(core, tuple(sorted(static.items())), in_tree, batchable)
            out_tree = jax.eval_shape(lambda *a: core(*a, **static), *arrays)
            outs = _call_p.bind(*flat, call=call)
            return tree_util.tree_unflatten(tree_util.tree_structure(out_tree), outs)

        core_names = list(inspect.signature(core.fun).parameters)
        nondiff = [core_names[i] for i in core.nondiff_argnums]

        def vjp(*args, **kwargs):
            arrays, static = split(args, kwargs)
            out, res = core.fwd(*arrays, **static)
            # custom_vjp passes nondiff (static) arguments to bwd first, in order.
            bwd = functools.partial(core.bwd, *[static[n] for n in nondiff])
            return out, tree_util.Partial(bwd, res)

        def backward(*args, **kwargs):
            if "v" in kwargs:
                v = kwargs.pop("v")
            elif args:
                *args, v = args
            else:
                raise TypeError(f"{check.__name__}.backward needs the upstream gradient v")
            return vjp(*args, **kwargs)[1](v)

        apply.vjp, apply.backward, apply.core = vjp, backward, core
        return apply

    return decorate


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

"""Every JAX name that jbackprop uses outside JAX's documented public API, in one place.

Tested with the oldest JAX that ``pyproject.toml`` allows (CI runs a subset of the tests on it,
``.ci/run``) and with the newest release (the full suite). When JAX moves one of these names,
only this file changes.

* ``Primitive``, ``ad``, ``batching``, ``mlir``: defining the ``jbackprop_call`` and
  ``jbackprop_linear`` primitives (``jbackprop.modules.rules``): JVP, transpose and batching
  rules and lowering (``ad.Zero``, ``ad.instantiate_zeros``, ``ad.is_undefined_primal``).
* ``def_batcher``: a batching rule that is told which ``jax.vmap`` axis it batches (its name,
  its ``spmd_axis_name`` and its size: ``batching.fancy_primitive_batchers``), so that the
  rules vmapped inside it can bind the same name (``batch_norm``'s ``lax.pmean`` over
  ``axis_name``); ``core.no_axis_name`` is the name of an unnamed ``jax.vmap``.
* ``Tracer``: telling a traced value from a concrete one (labels are range-checked only when
  concrete).
* ``shaped_array``: the abstract value of one output of the primitive.
* ``custom_vjp_rules``: the forward rule, backward rule and non-differentiable argument
  positions stored on a user's ``jax.custom_vjp`` function (``jbackprop.check.nonfinite``).
* ``set_custom_vjp_rules``: putting a forward and backward rule on a ``jax.custom_vjp``
  function or a ``jb.custom_rules`` core (or back), as exactly these objects
  (``jbackprop.check.nonfinite``).
* ``varying_axes`` and ``mark_varying``: inside ``jax.shard_map``, the mesh axes along which
  a value varies (its type's ``vma``) and the cast that makes a replicated value varying
  (``lax.pcast(..., to="varying")``, ``lax.pvary`` before it; the type's ``vma``, its
  ``manual_axis_type.varying`` from JAX 0.10); outside ``shard_map``, or
  on a JAX without them, no axes and the identity.
* ``explicit_sharding``: the sharding of a value typed on a mesh with ``AxisType.Explicit``
  axes (``None`` otherwise), passed as ``out_sharding`` to a contraction over sharded axes.
* ``weakly_typed``: a value made weakly typed (the cotangent and tangent of a Python scalar
  are weakly typed, as JAX's own; ``jax.lax`` has no public way to say so).
* ``enable_x64``: the context manager that turns on float64 (``jax.enable_x64`` from JAX 0.8,
  ``jax.experimental.enable_x64`` before).
"""
from __future__ import annotations

import jax
from jax.core import ShapedArray, Tracer
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

OLDEST_TESTED_JAX = "0.7.0"

__all__ = ["Primitive", "ad", "batching", "mlir", "Tracer", "shaped_array", "custom_vjp_rules",
           "set_custom_vjp_rules", "OLDEST_TESTED_JAX", "def_batcher", "weakly_typed",
           "enable_x64", "varying_axes", "varying_axes_of_aval", "mark_varying",
           "explicit_sharding"]


def shaped_array(struct, like=None) -> ShapedArray:
    """The abstract value of a ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``), keeping its
    weak type (a Python scalar's ``0.0`` must not turn float16 arithmetic into float32), and,
    inside ``shard_map``, varying along the same mesh axes as the input aval ``like``."""
    aval = ShapedArray(struct.shape, struct.dtype, weak_type=bool(struct.weak_type))
    if like is None or not varying_axes_of_aval(like):
        return aval
    if getattr(like, "manual_axis_type", None) is not None:           # JAX ≥ 0.10
        from jax.sharding import NamedSharding, PartitionSpec
        return aval.update(sharding=NamedSharding(like.sharding.mesh, PartitionSpec()),
                           manual_axis_type=like.manual_axis_type)
    return aval.update(vma=like.vma)                                   # JAX 0.7–0.9


def def_batcher(prim, rule) -> None:
    """Batch ``prim`` by ``rule(args, dims, size, axis, **params) -> (outs, out_dims)``, where
    ``axis = (name, spmd_axis_name)`` of the ``jax.vmap`` (``name`` ``None`` when unnamed) and
    ``dims`` may all be ``None`` (nothing batched: the rule decides)."""
    from jax._src import core as jax_core
    unnamed = getattr(jax_core, "no_axis_name", None)

    def fancy(axis_data, args, dims, **params):
        name = None if axis_data.name is unnamed else axis_data.name
        return rule(args, dims, axis_data.size, (name, axis_data.spmd_name), **params)
    batching.fancy_primitive_batchers[prim] = fancy


def custom_vjp_rules(core):
    """``(fwd, bwd, nondiff_argnums, parameter names)`` of a ``jax.custom_vjp`` function (a
    user's; the modules' cores are ``jb.custom_rules``, whose rules are plain attributes)."""
    import inspect
    names = list(inspect.signature(core.fun).parameters)
    return core.fwd, core.bwd, tuple(core.nondiff_argnums), names


def set_custom_vjp_rules(core, fwd, bwd) -> None:
    """Store ``fwd`` and ``bwd`` on a ``jax.custom_vjp`` function as these very objects (what
    ``defvjp(fwd, bwd)`` stores, without any wrapping), so that restoring a saved pair gives
    back the identical rules."""
    core.fwd, core.bwd = fwd, bwd


def weakly_typed(x):
    """``x`` as a weakly typed value of its dtype."""
    from jax._src.lax.lax import _convert_element_type
    return _convert_element_type(x, x.dtype, weak_type=True)


def enable_x64(on: bool = True):
    """Float64 on (or off) inside a ``with`` block."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(on)
    from jax.experimental import enable_x64 as legacy   # JAX < 0.8
    return legacy(on)


def varying_axes(x) -> frozenset:
    """The ``shard_map`` mesh axes along which ``x`` varies (empty outside ``shard_map``)."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return frozenset()
    return varying_axes_of_aval(typeof(x))


def varying_axes_of_aval(aval) -> frozenset:
    """The mesh axes an abstract value varies along (its ``vma``)."""
    manual = getattr(aval, "manual_axis_type", None)           # JAX ≥ 0.10
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", None) or ())        # JAX 0.7–0.9


def mark_varying(x, axes: tuple):
    """``x`` cast to vary along ``axes`` too; its transpose sums the cotangent over them."""
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    if hasattr(jax.lax, "pvary"):
        return jax.lax.pvary(x, axes)
    return x


def explicit_sharding(x):
    """``x``'s sharding if its mesh has ``AxisType.Explicit`` axes, else ``None``."""
    typeof = getattr(jax, "typeof", None)
    sharding = getattr(typeof(x), "sharding", None) if typeof else None
    mesh = getattr(sharding, "mesh", None)
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    if mesh is None or explicit is None or explicit not in tuple(getattr(mesh, "axis_types", ())):
        return None
    return sharding

"""Every JAX name that jbackprop uses outside JAX's documented public API, in one place.

Tested with the oldest JAX that ``pyproject.toml`` allows (CI runs a subset of the tests on it,
``.ci/run``) and with the newest release (the full suite). When JAX moves one of these names,
only this file changes.

* ``Primitive``, ``ad``, ``batching``, ``mlir``: defining the ``jbackprop_call`` primitive
  (``jbackprop.modules.wiring``): its JVP rule, batching rule and lowering.
* ``Tracer``: telling a traced value from a concrete one (labels are range-checked only when
  concrete).
* ``shaped_array``: the abstract value of one output of the primitive.
* ``custom_vjp_rules``: the forward rule, backward rule and non-differentiable argument
  positions stored on a ``jax.custom_vjp`` function (for ``M.vjp`` / ``M.backward``).
* ``set_custom_vjp_rules``: putting a forward and backward rule on a ``jax.custom_vjp``
  function (or back), as exactly these objects (``jbackprop.check.nonfinite``).
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
           "set_custom_vjp_rules", "OLDEST_TESTED_JAX", "enable_x64"]


def shaped_array(struct) -> ShapedArray:
    """The abstract value of a ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``), keeping its
    weak type (a Python scalar's ``0.0`` must not turn float16 arithmetic into float32)."""
    return ShapedArray(struct.shape, struct.dtype, weak_type=bool(struct.weak_type))


def custom_vjp_rules(core):
    """``(fwd, bwd, nondiff_argnums, parameter names)`` of a ``jax.custom_vjp`` function."""
    import inspect
    names = list(inspect.signature(core.fun).parameters)
    return core.fwd, core.bwd, tuple(core.nondiff_argnums), names


def set_custom_vjp_rules(core, fwd, bwd) -> None:
    """Store ``fwd`` and ``bwd`` on a ``jax.custom_vjp`` function as these very objects (what
    ``defvjp(fwd, bwd)`` stores, without any wrapping), so that restoring a saved pair gives
    back the identical rules."""
    core.fwd, core.bwd = fwd, bwd


def enable_x64(on: bool = True):
    """Float64 on (or off) inside a ``with`` block."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(on)
    from jax.experimental import enable_x64 as legacy   # JAX < 0.8
    return legacy(on)

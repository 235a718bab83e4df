"""Argument checks shared by the modules: raised at trace time, naming the argument and shapes."""
from __future__ import annotations

from collections.abc import Mapping
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop._compat import Tracer


def float_array(x: Any, name: str, *, min_ndim: int = 0) -> jax.Array:
    """``x`` as a JAX array of a floating dtype, or a ``TypeError``/``ValueError`` naming it."""
    if isinstance(x, (bool, np.bool_)) or x is None:
        raise TypeError(f"{name} must be a floating-point array, got {type(x).__name__}")
    if isinstance(x, (int, float)):
        x = jnp.asarray(float(x))
    try:
        x = jnp.asarray(x)
    except TypeError as e:
        raise TypeError(f"{name} must be a floating-point array, got {type(x).__name__}") from e
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype} "
                        f"(shape {x.shape}); convert it with .astype(jnp.float32)")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {x.shape}")
    return x


def params_dict(params: Any, name: str, required: tuple[str, ...],
                optional: tuple[str, ...] = ()) -> dict[str, jax.Array]:
    """Check a parameter dict's keys; return its float arrays (``optional`` keys may be absent)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{name} must be a dict with keys {list(required + optional)}, "
                        f"got {type(params).__name__}")
    missing = [k for k in required if k not in params]
    unknown = [k for k in params if k not in required + optional]
    if missing or unknown:
        raise ValueError(f"{name} must have keys {list(required)}"
                         + (f" (optionally {list(optional)})" if optional else "")
                         + f"; got {sorted(params)}"
                         + (f", missing {missing}" if missing else "")
                         + (f", unknown {unknown}" if unknown else ""))
    return {k: float_array(params[k], f"{name}[{k!r}]") for k in params}


def ndim(x: jax.Array, name: str, expected: int) -> None:
    if x.ndim != expected:
        raise ValueError(f"{name} must have {expected} dimension(s), got shape {x.shape}")


def static_number(x: Any, name: str, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> float:
    """A finite static (Python) hyper-parameter in ``[low, high]`` (``(low, high]`` if
    ``low_open``; an absent bound is no bound)."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a Python number (a static hyper-parameter), "
                        f"got {type(x).__name__}")
    x = float(x)
    too_low = low is not None and (x < low or (low_open and x == low))
    if too_low or (high is not None and x > high) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number {_interval(low, high, low_open)}, "
                         f"got {x}")
    return x


def _interval(low, high, low_open) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    if low is not None:
        return f"{'>' if low_open else '≥'} {low:g}"
    return f"≤ {high:g}" if high is not None else ""


def labels(y: Any, name: str, num_classes: int | None = None) -> jax.Array:
    """Integer class labels; values are checked against ``0..num_classes-1`` when concrete.

    A Python int or a NumPy array closed over by ``jax.jit`` is concrete: it is checked *before*
    it becomes a JAX array (which, inside ``jit``, would be a traced constant). Labels that are
    traced (arguments of a jitted function) cannot be checked at trace time."""
    if not isinstance(y, Tracer):
        y_np = np.asarray(y)
        if not (np.issubdtype(y_np.dtype, np.integer) or y_np.dtype == np.bool_):
            raise TypeError(f"{name} must be an integer class index, got dtype {y_np.dtype}")
        if num_classes is not None:
            bad = (y_np < 0) | (y_np >= num_classes)
            if bad.any():
                raise ValueError(f"{name} must be in 0..{num_classes - 1} (the logits have "
                                 f"{num_classes} classes), got {y_np[bad].ravel()[:5].tolist()}")
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer class index, got dtype {y.dtype}")
    return y


def promote(*trees: Any) -> tuple[Any, ...]:
    """Cast every floating leaf of ``trees`` to their common dtype under JAX's promotion rules.

    Weak-typed Python scalars take the arrays' dtype (``0.0`` with float16 stays float16); a
    float32 parameter with a float64 input becomes float64, as ``jnp`` would compute it. The
    casts happen *outside* the module's ``custom_vjp`` core, so ``jax.grad`` casts each
    cotangent back to its primal's dtype. Integer leaves (labels) are left alone.
    """
    floats = [x for x in jax.tree.leaves(trees) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    if not floats:
        return trees
    dtype = jnp.result_type(*floats)
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x
    return tuple(jax.tree.map(lambda x: cast(jnp.asarray(x)), t) for t in trees)

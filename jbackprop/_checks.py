"""Argument checks shared by the modules: raised at trace time, naming the argument and shapes."""
from __future__ import annotations

from collections.abc import Mapping
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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
    """A static (Python) hyper-parameter in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a Python number (a static hyper-parameter), "
                        f"got {type(x).__name__}")
    x = float(x)
    if (low is not None and (x < low or (low_open and x == low))) or \
            (high is not None and x > high) or x != x:
        lo = "(" if low_open else "["
        raise ValueError(f"{name} must be in {lo}{low}, {high}], got {x}")
    return x


def labels(y: Any, name: str, num_classes: int | None = None) -> jax.Array:
    """Integer class labels; values are checked against ``0..num_classes-1`` when concrete."""
    y = jnp.asarray(y) if not isinstance(y, jax.Array) else y
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer class index, got dtype {y.dtype}")
    if num_classes is not None and not isinstance(y, jax.core.Tracer):
        yn = np.asarray(y)  # NumPy: concrete labels closed over under jit are not staged
        bad = (yn < 0) | (yn >= num_classes)
        if bad.any():
            raise ValueError(f"{name} must be in 0..{num_classes - 1} (the logits have "
                             f"{num_classes} classes), got {yn[bad].ravel()[:5].tolist()}")
    return y

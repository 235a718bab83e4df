"""Small array helpers of the checker: the comparison of a cotangent with its evidence, the
leaves' labels, seeded normal numbers, inner products and dtype tests."""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop.check.report import Comparison


def compare(actual, expected, tol) -> Comparison:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != e.shape:
        return Comparison(float("inf"), float("inf"), (), float("nan"), float("nan"), tol,
                          f"shape {a.shape} != expected {e.shape}")
    diff = np.abs(a - e)
    if not np.all(np.isfinite(a)):
        diff = np.where(np.isfinite(a), diff, np.inf)
    idx = np.unravel_index(int(np.argmax(diff)), a.shape) if a.size else ()
    scale = float(np.max(np.abs(e), initial=0.0))
    m = float(diff[idx]) if a.size else 0.0
    err = m / scale if scale > 0 else (0.0 if m == 0 else float("inf"))
    return Comparison(err, m, tuple(int(i) for i in idx), float(a[idx]) if a.size else 0.0,
                      float(e[idx]) if a.size else 0.0, tol)


def labels(fn, args, argnums) -> list[str]:
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        names = []
    names = names if len(names) >= len(args) else [f"arg{i}" for i in range(len(args))]
    out = []
    for i in argnums:
        for path, _ in jax.tree_util.tree_flatten_with_path(args[i])[0]:
            out.append(names[i] + "".join(f"[{k.key!r}]" if hasattr(k, "key") else f"[{k.idx}]"
                                          for k in path))
    return out


def normal(seed, k, shape, dtype):
    """Standard normal numbers from NumPy (no compilation per shape, unlike jax.random)."""
    return jnp.asarray(np.random.default_rng([seed, k]).standard_normal(shape), dtype)


def inner(v, out):
    return sum(jnp.vdot(jnp.asarray(a, jnp.result_type(b)), b)
               for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(out)))


def to64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if is_float(a) else a, tree)


def is_float(a) -> bool:
    return jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)


def all_float(a) -> bool:
    leaves = jax.tree.leaves(a)
    return bool(leaves) and all(is_float(x) for x in leaves)

"""Small array helpers of the checker: the comparison of a cotangent with its evidence, the
leaves' labels, seeded normal numbers, inner products and dtype tests."""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop.check.report import Comparison


def compare(actual, expected, tol, scale=None, noise=None) -> Comparison:
    """Per element: ``max(0, |a_i − e_i| − noise_i) / (|e_i| + scale_i)``, the worst element.

    ``scale`` is the element's local scale (``differences.local_scale``: how much ``e_i`` moves
    when the inputs move by their relative round-off), ``noise`` the evidence's own error (finite
    differences). Neither is the largest element of the leaf: a 200 % error on a small element
    next to large ones fails. A non-finite ``a_i`` where ``e_i`` is finite is an infinite error."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != e.shape:
        return Comparison(float("inf"), float("inf"), (), float("nan"), float("nan"), tol,
                          f"shape {a.shape} != expected {e.shape}")
    if not a.size:
        return Comparison(0.0, 0.0, (), 0.0, 0.0, tol)
    diff = np.abs(a - e)
    diff = np.where(a == e, 0.0, np.where(np.isfinite(diff), diff, np.inf))
    excess = np.maximum(0.0, diff - (0.0 if noise is None else np.asarray(noise, np.float64)))
    floor = np.abs(np.where(np.isfinite(e), e, 0.0)) + (0.0 if scale is None else np.asarray(scale, np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.where(excess == 0, 0.0, excess / np.maximum(floor, _TINY))
    idx = np.unravel_index(int(np.argmax(err)), a.shape)
    return Comparison(float(err[idx]), float(diff[idx]), tuple(int(i) for i in idx), float(a[idx]),
                      float(e[idx]), tol)


_TINY = float(np.finfo(np.float64).tiny)


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

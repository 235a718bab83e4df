"""Shared pieces of the test-suite. Every gradient comparison is against something independent
(``jax.grad`` of the pure-jnp reference in ``jbackprop.reference``, float64 finite
differences, or a closed form), never the hand-written backward against itself. The modules'
full verification runs from the registry (``tests/test_registry.py``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

REL = 1e-10  # float64: hand-written backward vs autodiff of the reference
U32 = float(np.finfo(np.float32).eps) / 2    # unit round-off of float32, 2^-24
U_BF16 = float(jnp.finfo(jnp.bfloat16).eps) / 2   # unit round-off of bfloat16, 2^-9


def assert_close(actual, expected, rel=REL, what=""):
    """Leaf-wise |a − e| ≤ rel · (|e| + max|e|): relative, robust to zeros in ``e``."""
    la, ta = jax.tree.flatten(actual)
    le, te = jax.tree.flatten(expected)
    assert ta == te, f"{what}: tree structures differ: {ta} vs {te}"
    for a, e in zip(la, le):
        a, e = np.asarray(a, dtype=np.float64), np.asarray(e, dtype=np.float64)
        assert a.shape == e.shape, f"{what}: shapes differ: {a.shape} vs {e.shape}"
        scale = np.max(np.abs(e), initial=0.0) + np.finfo(np.float64).tiny
        np.testing.assert_allclose(a, e, rtol=rel, atol=rel * scale, err_msg=what)


def cast(tree, dtype):
    """Every floating leaf of ``tree`` as ``dtype``; other leaves (integer labels) unchanged.

    Casting float32 or bfloat16 numbers to float64 is exact: a float64 reference evaluated at
    ``cast(x32, jnp.float64)`` sees the very numbers the low-precision module saw."""
    return jax.tree.map(lambda a: jnp.asarray(a).astype(dtype)
                        if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, tree)


def max_abs(tree) -> float:
    """max |x| over all leaves: the scale of a tree, for absolute tolerances."""
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))

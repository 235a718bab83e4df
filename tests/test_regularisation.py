"""Dropout beyond the registry's cases (tests/test_registry.py and tests/test_forward_mode.py
verify both rules at two shapes and two rates with raw keys, in float32 and float64): new-style
keys, no stored mask, the key's missing gradient, per-example keys, statistics and bad input."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from jbackprop.testing import assert_jvp_correct, assert_vjp_correct


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["key", "PRNGKey"])
def test_both_key_kinds_through_the_checker(make_key):
    z = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5)))
    key = make_key(3)
    f = lambda z: jb.dropout(z, key, 0.3)
    assert_vjp_correct(f, z, reference=lambda z: ref.dropout(z, key, 0.3), name="dropout")
    assert_jvp_correct(f, z, reference=lambda z: ref.dropout(z, key, 0.3))


def test_the_only_residual_is_the_key():
    z = jnp.ones((64, 64))
    for key in (jax.random.key(0), jax.random.PRNGKey(0)):
        _, lin = jb.dropout.linearize(z, key, rate=0.5)
        assert [x.size for x in jax.tree.leaves(lin.residuals)] == [np.size(key)]


def test_the_key_gets_no_gradient_and_rate_zero_is_the_identity():
    z = jnp.arange(6.0)
    key = jax.random.key(1)
    grads = jax.grad(lambda z, k: jnp.sum(jb.dropout(z, k, 0.5)), argnums=(0, 1),
                     allow_int=True)(z, key)
    assert grads[1].dtype == jax.dtypes.float0             # JAX's zero cotangent of a key
    assert jb.dropout(z, key, 0) is z


def test_per_example_keys_give_independent_masks_and_the_mean_is_kept():
    z = jnp.ones((4, 20000))
    keys = jax.random.split(jax.random.key(2), 4)
    u = jax.vmap(lambda z, k: jb.dropout(z, k, 0.25))(z, keys)
    assert len({tuple(np.asarray(r[:50] != 0)) for r in u}) == 4       # four different masks
    np.testing.assert_allclose(np.asarray(u.mean(axis=1)), 1.0, atol=0.02)   # E[u] = z
    assert set(np.unique(np.asarray(u)).tolist()) == {0.0, 1 / 0.75}
    same = jax.vmap(lambda z: jb.dropout(z, keys[0], 0.25))(z)         # one key: one mask
    chex.assert_trees_all_equal(same[0], same[3])


def test_errors_name_the_argument():
    z = jnp.ones(3)
    for rate in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\)"):
            jb.dropout(z, jax.random.key(0), rate)
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        jb.dropout(z, jnp.array([1.0, 2.0]), 0.5)
    with pytest.raises(ValueError, match="key must be a single key"):
        jb.dropout(z, jax.random.split(jax.random.key(0), 2), 0.5)
    with pytest.raises(TypeError, match="z must be a floating-point array"):
        jb.dropout(jnp.ones(3, jnp.int32), jax.random.key(0), 0.5)

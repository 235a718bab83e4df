"""Pooling beyond the registry's cases (tests/test_registry.py and tests/test_forward_mode.py
verify both rules of the four poolings at two shapes and two window/stride settings, in float32
and float64): the tie rule against a closed form, overlapping windows, a batch of images,
shapes and bad input."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from jbackprop.testing import assert_vjp_correct

EXACT = {"rtol": 1e-14, "atol": 1e-14}


def test_max_pool_ties_route_v_to_the_first_maximal_position():
    """Closed form: window [2, 5, 5] has its maximum twice; v goes to the first (index 1).
    In 2-D, a 2×2 window of equal values sends v to its top-left pixel (row-major)."""
    z = jnp.array([[2.0], [5.0], [5.0], [1.0], [7.0], [7.0]])        # (6, 1), windows of 3
    (z_bar,) = jax.vjp(lambda z: jb.max_pool1d(z, 3), z)[1](jnp.array([[10.0], [20.0]]))
    chex.assert_trees_all_close(z_bar, jnp.array([[0.0], [10.0], [0.0], [0.0], [20.0], [0.0]]),
                                **EXACT)
    flat = jnp.ones((2, 2, 1))
    (z_bar,) = jax.vjp(lambda z: jb.max_pool2d(z, 2), flat)[1](jnp.array([[[3.0]]]))
    chex.assert_trees_all_close(z_bar[..., 0], jnp.array([[3.0, 0.0], [0.0, 0.0]]), **EXACT)
    z_dot = jax.jvp(lambda z: jb.max_pool1d(z, 3), (z,), (jnp.arange(6.0)[:, None],))[1]
    chex.assert_trees_all_close(z_dot, jnp.array([[1.0], [4.0]]), **EXACT)   # ż at 1 and 4


def test_overlapping_windows_add_their_cotangents():
    """Stride 1 < window 3: the maximum 9 is in three windows; its cotangent is their sum."""
    z = jnp.array([[0.0], [1.0], [9.0], [2.0], [3.0]])
    (z_bar,) = jax.vjp(lambda z: jb.max_pool1d(z, 3, stride=1), z)[1](jnp.ones((3, 1)))
    chex.assert_trees_all_close(z_bar[:, 0], jnp.array([0.0, 0.0, 3.0, 0.0, 0.0]), **EXACT)
    (z_bar,) = jax.vjp(lambda z: jb.avg_pool1d(z, 3, stride=1), z)[1](jnp.ones((3, 1)))
    chex.assert_trees_all_close(z_bar[:, 0], jnp.array([1, 2, 3, 2, 1]) / 3.0, **EXACT)


@pytest.mark.parametrize("name", ["max_pool2d", "avg_pool2d"])
def test_a_batch_of_images_with_rectangular_windows_through_the_checker(name):
    """Leading axes (2 images), window (2, 3), stride (1, 2): both rules, the checker."""
    z = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 7, 2)))
    f = lambda z: getattr(jb, name)(z, (2, 3), stride=(1, 2))
    reference = jax.vmap(lambda z: getattr(ref, name)(z, (2, 3), (1, 2)))
    assert f(z).shape == (2, 4, 3, 2)
    assert_vjp_correct(f, z, reference=reference, name=name)


def test_max_pool_residual_is_one_position_per_output():
    z = jnp.asarray(np.random.default_rng(1).standard_normal((8, 8, 4)))
    _, lin = jb.max_pool2d.linearize(z, 2)
    sizes = sorted(x.size for x in jax.tree.leaves(lin.residuals))
    assert sizes == [0, 4 * 4 * 4], sizes             # positions (16 outputs × 4), z's shape


def test_errors_name_the_argument():
    z = jnp.ones((5, 2))
    with pytest.raises(ValueError, match=r"window \(6,\) is larger than the input's spatial shape \(5,\)"):
        jb.max_pool1d(z, 6)
    with pytest.raises(ValueError, match="window must be a positive integer, got 0"):
        jb.avg_pool1d(z, 0)
    with pytest.raises(ValueError, match="stride must be a positive integer"):
        jb.max_pool1d(z, 2, stride=1.5)
    with pytest.raises(ValueError, match="window must be a positive integer or a pair of them"):
        jb.max_pool2d(jnp.ones((4, 4, 1)), (2, 2, 2))
    with pytest.raises(ValueError, match="must have at least 3 dimension"):
        jb.avg_pool2d(z, 2)
    with pytest.raises(TypeError, match="z must be a floating-point array"):
        jb.max_pool1d(jnp.ones((5, 2), jnp.int32), 2)

"""Softmax, attention and multi-head attention beyond the registry's cases
(tests/test_registry.py and tests/test_forward_mode.py verify both rules of each at the declared
shapes, causal and not, in float32 and float64): cross-attention (n ≠ m), the blocked path at
many blocks, the O(n·d) residuals, extreme scores, closed forms and bad input."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from jbackprop.testing import assert_jvp_correct, assert_vjp_correct

F64 = {"rtol": 1e-12, "atol": 1e-12}


def _qkv(n, m, d=4, dv=3, seed=0, lead=()):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((*lead, *s))) for s in ((n, d), (m, d), (m, dv)))


@pytest.mark.parametrize("block_size", [128, 2], ids=["one block", "blocks of 2"])
def test_cross_attention_n_not_m_through_the_checker(block_size):
    """n = 5 queries over m = 7 keys (not square: no causal mask), both rules verified."""
    q, k, v = _qkv(5, 7)
    f = lambda q, k, v: jb.attention(q, k, v, block_size=block_size)
    assert_vjp_correct(f, q, k, v, reference=ref.attention, name="attention 5x7")
    assert_jvp_correct(f, q, k, v, reference=ref.attention)


@pytest.mark.parametrize("causal", [False, True])
def test_many_blocks_with_padding_equal_the_reference(causal):
    """n = 37 rows in blocks of 8 (five blocks, the last padded with three rows): output,
    gradients of q, k, v and the JVP equal the reference's (float64)."""
    q, k, v = _qkv(37, 37, d=8, dv=5, seed=1)
    f = lambda q, k, v: jnp.sum(jnp.sin(jb.attention(q, k, v, causal=causal, block_size=8)))
    fr = lambda q, k, v: jnp.sum(jnp.sin(ref.attention(q, k, v, causal=causal)))
    chex.assert_trees_all_close(jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v),
                                jax.jit(jax.value_and_grad(fr, (0, 1, 2)))(q, k, v), **F64)
    dots = _qkv(37, 37, d=8, dv=5, seed=2)
    chex.assert_trees_all_close(jax.jvp(f, (q, k, v), dots), jax.jvp(fr, (q, k, v), dots), **F64)


def test_residuals_are_O_n_d_not_the_n_by_m_matrix():
    """What the forward rule keeps: q, k, v and the output, and nothing of n × m elements."""
    n = m = 64
    q, k, v = _qkv(n, m, d=8, dv=8)
    _, lin = jb.attention.linearize(q, k, v, causal=True)
    shapes = sorted(x.shape for x in jax.tree.leaves(lin.residuals))
    assert shapes == sorted([(n, 8), (m, 8), (m, 8), (n, 8)]), shapes
    assert all(x.size < n * m for x in jax.tree.leaves(lin.residuals))


def test_causal_first_row_sees_only_its_own_key_and_large_scores_stay_finite():
    """Closed forms: with causal=True row 0 is v[0]; scores of ±1e4 do not overflow; the
    gradients stay finite and equal the reference's."""
    q, k, v = _qkv(6, 6)
    out = jb.attention(q, k, v, causal=True)
    chex.assert_trees_all_close(out[0], v[0], **F64)
    big = 1e4 * q
    chex.assert_tree_all_finite(jax.grad(lambda q: jnp.sum(jb.attention(q, k, v, causal=True)))(big))
    chex.assert_trees_all_close(jb.attention(big, k, v, causal=True),
                                ref.attention(big, k, v, causal=True), **F64)


def test_uniform_attention_is_the_mean_of_the_values():
    """q = 0: every score is 0, P is uniform and O is the mean of v (the causal mean of the
    first i + 1 values)."""
    _, k, v = _qkv(4, 4)
    q = jnp.zeros((4, 4))
    chex.assert_trees_all_close(jb.attention(q, k, v), jnp.broadcast_to(v.mean(0), (4, 3)), **F64)
    chex.assert_trees_all_close(jb.attention(q, k, v, causal=True),
                                jnp.cumsum(v, 0) / jnp.arange(1, 5)[:, None], **F64)


def test_softmax_closed_form_and_extreme_logits():
    z = jnp.array([[0.0, 1e4, -1e4], [1.0, 1.0, 1.0]])
    chex.assert_trees_all_close(jb.softmax(z), jnp.array([[0.0, 1.0, 0.0], [1 / 3] * 3]), **F64)
    v = jnp.array([1.0, 2.0, 4.0])
    s = jb.softmax(jnp.array([0.2, -0.5, 1.0]))
    chex.assert_trees_all_close(jb.backward(jb.softmax)(jnp.array([0.2, -0.5, 1.0]), v)[0],
                                s * (v - s @ v), **F64)           # s ⊙ (v − ⟨s, v⟩)
    chex.assert_tree_all_finite(jax.grad(lambda z: jnp.sum(jb.softmax(z) * z))(z))


def test_multi_head_attention_with_a_batch_of_sequences_equals_vmap():
    params = jb.multi_head_attention_init(jax.random.PRNGKey(0), 8, 2, jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 8), jnp.float64)
    f = lambda p, x: jb.multi_head_attention(p, x, 2, causal=True)
    chex.assert_trees_all_close(f(params, x), jax.vmap(f, (None, 0))(params, x), **F64)
    g = jax.grad(lambda p: jnp.sum(jnp.sin(f(p, x))))(params)
    g_ref = jax.grad(lambda p: jnp.sum(jnp.sin(jax.vmap(
        lambda xi: ref.multi_head_attention(p, xi, 2, causal=True))(x))))(params)
    chex.assert_trees_all_close(g, g_ref, **F64)


def test_errors_name_the_argument():
    q, k, v = _qkv(5, 7)
    with pytest.raises(ValueError, match=r"causal=True needs as many queries as keys.*n=5.*m=7"):
        jb.attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match=r"q \(5, 4\), k \(7, 3\)"):
        jb.attention(q, k[:, :3], v)
    with pytest.raises(ValueError, match="k .*v "):
        jb.attention(q, k, v[:6])
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        jb.attention(q, k, v, block_size=0)
    with pytest.raises(TypeError, match="causal must be True or False"):
        jb.attention(q, k, v, causal="yes")
    with pytest.raises(TypeError, match="q must be a floating-point array"):
        jb.attention(jnp.ones((5, 4), jnp.int32), k, v)
    with pytest.raises(ValueError, match="z's last axis must not be empty"):
        jb.softmax(jnp.ones((3, 0)))
    with pytest.raises(ValueError, match="d_model=6 is not divisible by num_heads=4"):
        jb.multi_head_attention_init(jax.random.PRNGKey(0), 6, 4)
    params = jb.multi_head_attention_init(jax.random.PRNGKey(0), 8, 2)
    with pytest.raises(ValueError, match="d_model=8 is not divisible by num_heads=3"):
        jb.multi_head_attention(params, jnp.ones((4, 8)), 3)
    with pytest.raises(ValueError, match="params must be a dict with keys 'q', 'k', 'v', 'o'"):
        jb.multi_head_attention({"q": params["q"]}, jnp.ones((4, 8)), 2)

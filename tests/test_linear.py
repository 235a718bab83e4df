"""MM beyond the registry's cases (tests/test_registry.py runs ``assert_vjp_correct`` on
``jb.mm`` with and without a bias, in float32 and float64): closed-form backward formulas, the
lecture's shapes, batching design, transformations, dtypes, forward mode and bad input."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jbackprop as jb
from jbackprop import reference as ref
from helpers import U32, cast, max_abs

F64 = {"rtol": 1e-12, "atol": 1e-12}   # float64: hand-written vs autodiff of the reference


def _params(n=4, m=3, bias=True, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    p = {"W": jax.random.normal(k1, (n, m))}
    if bias:
        p["b"] = jax.random.normal(k2, (n,))
    return p


class MmWithAndWithoutJit(chex.TestCase):
    """``jb.mm``'s forward and ``jax.grad`` through its hand-written rule equal the reference's,
    eagerly and under ``jax.jit`` (chex runs each variant as its own test)."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("bias", True), ("no_bias", False))
    def test_forward_and_grad_equal_the_reference(self, bias):
        p, z = _params(bias=bias), jnp.array([0.5, -1.0, 2.0])
        c = jnp.array([1.5, -0.5, 2.0, 0.25])
        forward = self.variant(jb.mm)
        chex.assert_trees_all_close(forward(p, z), ref.mm(p, z), **F64)
        J = lambda f: lambda p, z: jnp.sum(c * f(p, z))
        grad = self.variant(jax.grad(J(jb.mm), (0, 1)))
        chex.assert_trees_all_close(grad(p, z), jax.grad(J(ref.mm), (0, 1))(p, z), **F64)


def test_mm_backward_formulas():
    """B[MM, z](v) = Wᵀv, B[MM, W](v) = v zᵀ, B[MM, b](v) = v, written out as closed forms."""
    p, z, v = _params(), jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, -1.0, 0.5, 2.0])
    p_bar, z_bar = jb.backward(jb.mm)(p, z, v)
    np.testing.assert_allclose(z_bar, np.asarray(p["W"]).T @ np.asarray(v), rtol=1e-14)
    np.testing.assert_allclose(p_bar["W"], np.outer(v, z), rtol=1e-14)
    np.testing.assert_allclose(p_bar["b"], v, rtol=1e-14)


def test_mm_matrix_multiply_slide_shapes():
    """The lecture's y = x w, x: N×D, w: D×M: dL/dx = (dL/dy) wᵀ, dL/dw = xᵀ (dL/dy)."""
    N, D, M = 2, 3, 4
    x = jax.random.normal(jax.random.PRNGKey(1), (N, D))
    w = jax.random.normal(jax.random.PRNGKey(2), (D, M))
    dy = jax.random.normal(jax.random.PRNGKey(3), (N, M))
    (p_bar, x_bar) = jb.backward(jb.mm)({"W": w.T}, x, dy)   # rows of x are examples
    chex.assert_trees_all_close(x_bar, dy @ w.T, **F64)
    chex.assert_trees_all_close(p_bar["W"].T, x.T @ dy, **F64)


def test_mm_leading_batch_axes_equal_vmap():
    p, X = _params(), jax.random.normal(jax.random.PRNGKey(4), (2, 5, 3))
    chex.assert_trees_all_close(jb.mm(p, X), jax.vmap(jax.vmap(lambda x: ref.mm(p, x)))(X), **F64)
    g = jax.grad(lambda p: jnp.sum(jb.mm(p, X) ** 2))(p)
    gr = jax.grad(lambda p: jnp.sum(jax.vmap(jax.vmap(lambda x: ref.mm(p, x)))(X) ** 2))(p)
    chex.assert_trees_all_close(g, gr, **F64)


def test_mm_vmap_weight_gradient_is_one_matmul():
    """Under vmap the hand-written weight gradient must be a single contraction over the batch,
    not a batch of outer products followed by a reduction (the batching design)."""
    p, X = _params(), jnp.ones((8, 3))
    text = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(jax.vmap(lambda x: jb.mm(p, x))(X))))(p))
    assert "dimension_numbers=(([0], [0]), ([], []))" in text  # Vᵀ X contracting the batch
    assert "f64[8,4,3]" not in text                           # no per-example outer products


def test_mm_vmap_over_params_falls_back():
    ps = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), _params())
    z = jnp.array([1.0, 2.0, 3.0])
    chex.assert_trees_all_close(jax.vmap(jb.mm, (0, None))(ps, z),
                                jax.vmap(ref.mm, (0, None))(ps, z), **F64)
    g = jax.grad(lambda ps: jnp.sum(jax.vmap(jb.mm, (0, None))(ps, z) ** 2))(ps)
    gr = jax.grad(lambda ps: jnp.sum(jax.vmap(ref.mm, (0, None))(ps, z) ** 2))(ps)
    chex.assert_trees_all_close(g, gr, **F64)


def test_mm_nested_vmap_and_checkpoint_and_scan():
    p, X = _params(n=3), jax.random.normal(jax.random.PRNGKey(5), (2, 4, 3))
    f = jax.checkpoint(lambda p, x: jnp.tanh(jb.mm(p, x)))
    r = lambda p, x: jnp.tanh(ref.mm(p, x))
    loss = lambda f: lambda p: jnp.sum(jax.vmap(jax.vmap(lambda x: f(p, x)))(X) ** 2)
    chex.assert_trees_all_close(jax.grad(loss(f))(p), jax.grad(loss(r))(p), **F64)

    def scanned(f):
        return lambda p, x: jax.lax.scan(lambda h, _: (f(p, h), None), x, None, length=3)[0]
    z = X[0, 0]
    chex.assert_trees_all_close(jax.grad(lambda p: jnp.sum(scanned(f)(p, z)))(p),
                                jax.grad(lambda p: jnp.sum(scanned(r)(p, z)))(p), **F64)


def test_mm_float32_and_bfloat16():
    """Float32 in, float32 cotangents out, within a few float32 round-offs of the exact gradient
    (the float64 reference's at the same float32 numbers); bfloat16 runs and stays finite."""
    p32, z32 = cast(_params(), jnp.float32), jnp.array([0.5, -1.0, 2.0], jnp.float32)
    p64, z64 = cast(p32, jnp.float64), cast(z32, jnp.float64)
    g = jax.grad(lambda p: jnp.sum(jb.mm(p, z32) ** 2))(p32)
    g64 = jax.grad(lambda p: jnp.sum(ref.mm(p, z64) ** 2))(p64)
    chex.assert_type(jax.tree.leaves(g), jnp.float32)
    # u = W z + b in float32 is within 4 round-offs of s = |W||z| + |b| (3 products, 3 sums);
    # b̄ = 2u and W̄ = 2u zᵀ carry twice that (times |z|), plus one rounding of the product.
    s = max_abs(jnp.abs(p64["W"]) @ jnp.abs(z64) + jnp.abs(p64["b"]))
    chex.assert_trees_all_close(g, g64, rtol=2 * U32,
                                atol=2 * 8 * U32 * s * max(1.0, max_abs(z64)))
    pb = cast(p32, jnp.bfloat16)
    out = jax.jit(jax.grad(lambda p: jnp.sum(jb.mm(p, z32.astype(jnp.bfloat16)) ** 2)))(pb)
    chex.assert_type(out["W"], jnp.bfloat16)
    assert bool(jnp.all(jnp.isfinite(out["W"])))


def test_second_order_every_way_equals_the_reference_hessian():
    """jacfwd(jacrev) (jax.hessian), jacrev(jacrev), jacfwd(jacfwd), jacrev(jacfwd): each
    composes the hand-written rules, and each is the reference's Hessian."""
    p, z = _params(n=3), jnp.array([0.5, -1.0, 2.0])
    f = lambda z: jnp.sum(jnp.tanh(jb.mm(p, z)) ** 2)
    Hr = jax.hessian(lambda z: jnp.sum(jnp.tanh(ref.mm(p, z)) ** 2))(z)
    for outer in (jax.jacfwd, jax.jacrev):
        for inner in (jax.jacfwd, jax.jacrev):
            chex.assert_trees_all_close(outer(inner(f))(z), Hr, **F64)


@pytest.mark.parametrize("params, z, exc, match", [
    ({"W": jnp.ones((4, 3))}, jnp.ones(5), ValueError, r"\(4, 3\).*\(5,\)"),
    ({"W": jnp.ones((4, 3)), "b": jnp.ones(3)}, jnp.ones(3), ValueError, r"params\['b'\]"),
    ({"W": jnp.ones(3)}, jnp.ones(3), ValueError, r"params\['W'\] must have 2"),
    ({"w": jnp.ones((4, 3))}, jnp.ones(3), ValueError, r"missing \['W'\].*unknown \['w'\]"),
    ([jnp.ones((4, 3))], jnp.ones(3), TypeError, "params must be a dict"),
    ({"W": jnp.ones((4, 3))}, jnp.ones(3, jnp.int32), TypeError, "z must be a floating"),
    ({"W": jnp.ones((4, 3))}, jnp.ones(()), ValueError, "z must have at least 1"),
])
def test_mm_bad_input(params, z, exc, match):
    with pytest.raises(exc, match=match):
        jb.mm(params, z)
    with pytest.raises(exc, match=match):   # at trace time, under jit as well
        jax.jit(jb.mm)(params, z)

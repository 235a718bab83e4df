import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from helpers import assert_close, check_module


def _params(n=4, m=3, bias=True, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    p = {"W": jax.random.normal(k1, (n, m))}
    if bias:
        p["b"] = jax.random.normal(k2, (n,))
    return p


@pytest.mark.parametrize("bias", [True, False])
def test_mm_against_reference(bias):
    z = jnp.array([0.5, -1.0, 2.0])
    check_module(jb.mm, ref.mm, (_params(bias=bias), z), batch=(1,))


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
    assert_close(x_bar, dy @ w.T)
    assert_close(p_bar["W"].T, x.T @ dy)


def test_mm_leading_batch_axes_equal_vmap():
    p, X = _params(), jax.random.normal(jax.random.PRNGKey(4), (2, 5, 3))
    assert_close(jb.mm(p, X), jax.vmap(jax.vmap(lambda x: ref.mm(p, x)))(X), 1e-12)
    g = jax.grad(lambda p: jnp.sum(jb.mm(p, X) ** 2))(p)
    gr = jax.grad(lambda p: jnp.sum(jax.vmap(jax.vmap(lambda x: ref.mm(p, x)))(X) ** 2))(p)
    assert_close(g, gr)


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
    assert_close(jax.vmap(jb.mm, (0, None))(ps, z), jax.vmap(ref.mm, (0, None))(ps, z), 1e-12)
    g = jax.grad(lambda ps: jnp.sum(jax.vmap(jb.mm, (0, None))(ps, z) ** 2))(ps)
    gr = jax.grad(lambda ps: jnp.sum(jax.vmap(ref.mm, (0, None))(ps, z) ** 2))(ps)
    assert_close(g, gr)


def test_mm_nested_vmap_and_checkpoint_and_scan():
    p, X = _params(n=3), jax.random.normal(jax.random.PRNGKey(5), (2, 4, 3))
    f = jax.checkpoint(lambda p, x: jnp.tanh(jb.mm(p, x)))
    r = lambda p, x: jnp.tanh(ref.mm(p, x))
    loss = lambda f: lambda p: jnp.sum(jax.vmap(jax.vmap(lambda x: f(p, x)))(X) ** 2)
    assert_close(jax.grad(loss(f))(p), jax.grad(loss(r))(p))

    def scanned(f):
        return lambda p, x: jax.lax.scan(lambda h, _: (f(p, h), None), x, None, length=3)[0]
    z = X[0, 0]
    assert_close(jax.grad(lambda p: jnp.sum(scanned(f)(p, z)))(p),
                 jax.grad(lambda p: jnp.sum(scanned(r)(p, z)))(p))


def test_mm_float32_and_bfloat16():
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), _params())
    z32 = jnp.array([0.5, -1.0, 2.0], jnp.float32)
    g = jax.grad(lambda p: jnp.sum(jb.mm(p, z32) ** 2))(p32)
    gr = jax.grad(lambda p: jnp.sum(ref.mm(p, z32) ** 2))(p32)
    assert g["W"].dtype == jnp.float32
    assert_close(g, gr, 1e-5)
    pb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p32)
    out = jax.jit(jax.grad(lambda p: jnp.sum(jb.mm(p, z32.astype(jnp.bfloat16)) ** 2)))(pb)
    assert out["W"].dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out["W"])))


def test_forward_mode_is_ruled_out():
    """custom_vjp has no forward mode; jacrev of jacrev works instead (README)."""
    p, z = _params(n=3), jnp.array([0.5, -1.0, 2.0])
    f = lambda z: jnp.sum(jnp.tanh(jb.mm(p, z)) ** 2)
    for forward_mode in (lambda: jax.jvp(f, (z,), (z,)), lambda: jax.jacfwd(f)(z),
                         lambda: jax.hessian(f)(z), lambda: jax.linearize(f, z)[1](z)):
        with pytest.raises(TypeError, match="forward-mode"):
            forward_mode()
    H = jax.jacrev(jax.jacrev(lambda z: jnp.sum(jnp.tanh(jb.mm(p, z)) ** 2)))(z)
    Hr = jax.hessian(lambda z: jnp.sum(jnp.tanh(ref.mm(p, z)) ** 2))(z)
    assert_close(H, Hr)


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

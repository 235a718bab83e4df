"""Convolutions beyond the registry's cases (tests/test_registry.py verifies each with k = 3
in float32 and float64): kernel sizes 1 and 5, other channel counts, kernels larger than the
input, the notes' Toeplitz formulas, batching design, dtypes and bad input."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from jbackprop.testing import assert_vjp_correct
from helpers import U32, cast

F64 = {"rtol": 1e-12, "atol": 1e-12}   # float64: hand-written vs autodiff of the reference
EXACT = {"rtol": 1e-13, "atol": 1e-13}  # float64: a closed form with the same few operations

# name: (module, reference, number of spatial axes, single channel?). The references are
# jitted: the same pure-jnp maths, compiled as one program instead of dozens of small eager
# ones (one per shifted slice), which keeps this file fast.
MODULES = {
    "conv1d_s": (jb.conv1d_s, jax.jit(ref.conv1d_s), 1, True),
    "conv1d": (jb.conv1d, jax.jit(ref.conv1d), 1, False),
    "conv2d_s": (jb.conv2d_s, jax.jit(ref.conv2d_s), 2, True),
    "conv2d": (jb.conv2d, jax.jit(ref.conv2d), 2, False),
}
SPATIAL = {1: (7,), 2: (5, 7)}   # small, and rectangular in 2-D


def _setup(name, k=3, C=2, C2=3, spatial=None, seed=0):
    """(module, reference, params, z) with random float64 values in the module's layout."""
    fn, r, n, single = MODULES[name]
    spatial = SPATIAL[n] if spatial is None else spatial
    w_shape = (k,) * n if single else (k,) * n + (C, C2)
    b_shape = () if single else (C2,)
    z_shape = spatial if single else spatial + (C,)
    p = {"w": _normal(w_shape, seed), "b": _normal(b_shape, seed + 100)}
    return fn, r, p, _normal(z_shape, seed + 200)


def _normal(shape, seed):
    """Random float64 values from numpy (no XLA compile per new shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


# --- against the reference, through the library's checker ---------------------------------
# Kernel sizes 1 and 5 (the registry's examples have k = 3); several channel counts in 1-D; in
# 2-D (the costly compiles) one pair of channel counts.
@pytest.mark.parametrize("name, k, C, C2", [
    ("conv1d_s", 1, 1, 1), ("conv1d_s", 5, 1, 1), ("conv2d_s", 1, 1, 1), ("conv2d_s", 5, 1, 1),
    ("conv1d", 1, 3, 2), ("conv1d", 5, 1, 2), ("conv2d", 1, 2, 3), ("conv2d", 5, 2, 3),
])
def test_kernel_sizes_against_reference(name, k, C, C2):
    """Autodiff of the reference, float64 finite differences, Taylor, adjoint, linearity, jit,
    vmap (over the data) and reverse-over-reverse."""
    fn, r, p, z = _setup(name, k=k, C=C, C2=C2, seed=k + C)
    assert_vjp_correct(fn, p, z, reference=r, name=f"{name} k={k}")


@pytest.mark.parametrize("name, k, spatial", [
    ("conv1d_s", 5, (3,)), ("conv1d", 7, (2,)), ("conv2d_s", 5, (3, 2)), ("conv2d", 3, (1, 2)),
])
def test_kernel_larger_than_input(name, k, spatial):
    """Zero padding handles k > m: the taps that fall outside the input multiply zeros.
    (Forward, jax.grad and the notes-form backward against the reference.)"""
    fn, r, p, z = _setup(name, k=k, spatial=spatial, seed=11)
    out = r(p, z)
    chex.assert_trees_all_close(fn(p, z), out, **F64)
    c = _normal(out.shape, 12)
    J = lambda f: lambda p, z: jnp.sum(c * f(p, z))
    expected = jax.grad(J(r), (0, 1))(p, z)
    chex.assert_trees_all_close(jax.grad(J(fn), (0, 1))(p, z), expected, **F64)
    chex.assert_trees_all_close(fn.backward(p, z, c), expected, **F64)


# --- the formulas of the notes, written out independently ---------------------------------
def _toeplitz(w, m):
    """Q of (7.49): Q[i, p] = w_{p−i+ℓ} (0-based) inside the band, 0 outside."""
    k = len(w)
    ell = k // 2
    Q = np.zeros((m, m))
    for i in range(m):
        for p in range(m):
            if 0 <= p - i + ell < k:
                Q[i, p] = w[p - i + ell]
    return Q


@pytest.mark.parametrize("k", [1, 3, 5])
def test_conv1d_s_is_toeplitz_matmul_and_backward_is_transpose(k):
    """Conv1D-S(z) = Qz + b (7.49); B[z](v) = Qᵀv, B[w](v)_j = Σ_i v_i z_{i−ℓ+j}, B[b](v) = Σv."""
    _, _, p, z = _setup("conv1d_s", k=k, spatial=(8,), seed=k)
    v = _normal((8,), 9)
    w, b, zn, vn = (np.asarray(a) for a in (p["w"], p["b"], z, v))
    Q = _toeplitz(w, 8)
    assert all(Q[i, j] == Q[i - 1, j - 1] for i in range(1, 8) for j in range(1, 8))
    chex.assert_trees_all_close(jb.conv1d_s(p, z), Q @ zn + b, **EXACT)

    p_bar, z_bar = jb.backward(jb.conv1d_s)(p, z, v)
    chex.assert_trees_all_close(z_bar, Q.T @ vn, **EXACT)
    zp = np.pad(zn, k // 2)                           # z_{1−ℓ..m+ℓ}, zeros outside
    chex.assert_trees_all_close(p_bar["w"], np.array([vn @ zp[j:j + 8] for j in range(k)]), **EXACT)
    chex.assert_trees_all_close(p_bar["b"], vn.sum(), **EXACT)
    # the same Qᵀv as a correlation of v with the flipped filter (docs/convolution.md)
    flipped = {"w": p["w"][::-1], "b": 0.0 * p["b"]}
    chex.assert_trees_all_close(z_bar, jb.conv1d_s(flipped, v), **EXACT)


def test_conv2d_s_is_block_toeplitz_matmul_and_backward_is_transpose():
    """In 2-D, vec(Conv2D-S(z)) = Q vec(z) + b with Q[(p,q),(p',q')] = w_{p'−p+ℓ, q'−q+ℓ}."""
    k, h, wd = 3, 4, 5
    _, _, p, z = _setup("conv2d_s", k=k, spatial=(h, wd), seed=4)
    v = _normal((h, wd), 9)
    w, ell = np.asarray(p["w"]), k // 2
    Q = np.zeros((h * wd, h * wd))
    for a in range(h):
        for c in range(wd):
            for a2 in range(h):
                for c2 in range(wd):
                    if 0 <= a2 - a + ell < k and 0 <= c2 - c + ell < k:
                        Q[a * wd + c, a2 * wd + c2] = w[a2 - a + ell, c2 - c + ell]
    chex.assert_trees_all_close(jb.conv2d_s(p, z).ravel(), Q @ np.ravel(z) + float(p["b"]), **EXACT)
    p_bar, z_bar = jb.backward(jb.conv2d_s)(p, z, v)
    chex.assert_trees_all_close(z_bar.ravel(), Q.T @ np.ravel(v), **EXACT)
    zp = np.pad(np.asarray(z), ell)
    w_bar = np.array([[np.sum(np.asarray(v) * zp[a:a + h, c:c + wd]) for c in range(k)]
                      for a in range(k)])
    chex.assert_trees_all_close(p_bar["w"], w_bar, **EXACT)
    chex.assert_trees_all_close(p_bar["b"], np.sum(v), **EXACT)


@pytest.mark.parametrize("name, single", [("conv1d", "conv1d_s"), ("conv2d", "conv2d_s")])
def test_multi_channel_is_sum_of_single_channel(name, single):
    """(7.50)/(7.51): output channel c' is Σ_c Conv-S_{c,c'}(z_c) + b_c'; backward likewise."""
    fn, _, p, z = _setup(name, k=3, C=2, C2=3, seed=5)
    fs = MODULES[single][0]
    v = _normal(z.shape[:-1] + (3,), 8)
    sub = lambda c, c2: {"w": p["w"][..., c, c2], "b": jnp.zeros(())}
    out = jnp.stack([sum(fs(sub(c, c2), z[..., c]) for c in range(2)) + p["b"][c2]
                     for c2 in range(3)], axis=-1)
    chex.assert_trees_all_close(fn(p, z), out, **EXACT)
    p_bar, z_bar = jb.backward(fn)(p, z, v)
    for c in range(2):
        zc = sum(jb.backward(fs)(sub(c, c2), z[..., c], v[..., c2])[1] for c2 in range(3))
        chex.assert_trees_all_close(z_bar[..., c], zc, **EXACT)
        for c2 in range(3):
            ps_bar, _ = jb.backward(fs)(sub(c, c2), z[..., c], v[..., c2])
            chex.assert_trees_all_close(p_bar["w"][..., c, c2], ps_bar["w"], **EXACT)
    chex.assert_trees_all_close(p_bar["b"], v.reshape(-1, 3).sum(0), **EXACT)


# --- batching --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODULES))
def test_leading_batch_axes_equal_vmap(name):
    fn, r, p, z = _setup(name, seed=2)
    X = jnp.stack([jnp.stack([z, -z, 0.5 * z]), jnp.stack([z ** 2, z + 1, 2 * z])])  # (2, 3, …)
    rr = lambda p, X: jax.vmap(jax.vmap(lambda x: r(p, x)))(X)
    chex.assert_trees_all_close(fn(p, X), rr(p, X), **F64)
    loss = lambda f: lambda p, X: jnp.sum(jnp.sin(f(p, X)))
    chex.assert_trees_all_close(jax.grad(loss(fn), (0, 1))(p, X), jax.grad(loss(rr), (0, 1))(p, X),
                                **F64)


@pytest.mark.parametrize("name", list(MODULES))
def test_vmap_weight_gradient_is_one_contraction(name):
    """Under vmap the weight gradient is one convolution contracting batch and positions,
    straight into the kernel's shape; no per-example (B, *kernel) gradient is formed."""
    B = 6
    fn, _, p, z = _setup(name, k=3, C=2, C2=4, seed=3)
    X = jnp.stack([z * (i + 1) for i in range(B)])
    text = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(jax.vmap(lambda x: fn(p, x))(X))))(p))
    w_shape = p["w"].shape
    canonical = w_shape + (1, 1) if MODULES[name][3] else w_shape   # the core's (*K, C, C2)
    dims = lambda s: ",".join(map(str, s))
    assert f"f64[{dims(canonical)}] = conv_general_dilated" in text
    for s in (w_shape, canonical):
        assert f"f64[{B},{dims(s)}]" not in text, f"per-example weight gradients {s}"


def test_vmap_over_params_falls_back():
    _, _, p, z = _setup("conv1d", seed=6)
    ps = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), p)
    chex.assert_trees_all_close(jax.vmap(jb.conv1d, (0, None))(ps, z),
                                jax.vmap(ref.conv1d, (0, None))(ps, z), **F64)
    loss = lambda f: lambda ps: jnp.sum(jax.vmap(f, (0, None))(ps, z) ** 2)
    chex.assert_trees_all_close(jax.grad(loss(jb.conv1d))(ps), jax.grad(loss(ref.conv1d))(ps),
                                **F64)


# --- dtypes ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODULES))
def test_float32_close_to_float64_reference(name):
    """Float32 cotangents against the exact ones (the float64 reference's at the same float32
    numbers). Each cotangent entry is a sum of at most n = z.size + w.size products, so in
    float32 it is within n·u·Σ|terms| of the exact value (u = 2⁻²⁴, any summation order); the
    conv is affine in (w, b) and in z, so Σ|terms| is the same gradient taken at |c|, |p|, |z|."""
    fn, r, p, z = _setup(name, seed=7)
    p32, z32 = cast(p, jnp.float32), cast(z, jnp.float32)
    c32 = _normal(r(p, z).shape, 1).astype(jnp.float32)
    grad = lambda f, c, p, z: jax.grad(lambda p, z: jnp.sum(c * f(p, z)), (0, 1))(p, z)
    with jax.default_matmul_precision("float32"):   # true float32 (no TF32 on GPUs)
        g32 = grad(fn, c32, p32, z32)
    chex.assert_type(jax.tree.leaves(g32), jnp.float32)
    p64, z64, c64 = cast((p32, z32, c32), jnp.float64)
    exact = grad(r, c64, p64, z64)
    terms = grad(r, jnp.abs(c64), jax.tree.map(jnp.abs, p64), jnp.abs(z64))
    n = z.size + p["w"].size
    for got, want, t in zip(jax.tree.leaves(g32), jax.tree.leaves(exact), jax.tree.leaves(terms)):
        chex.assert_trees_all_close(got, want, rtol=0, atol=n * U32 * float(jnp.max(t)))


@pytest.mark.parametrize("name", list(MODULES))
def test_bfloat16_runs(name):
    fn, _, p, z = _setup(name, seed=7)
    bf = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
    assert fn(bf(p), bf(z)).dtype == jnp.bfloat16
    g = jax.jit(jax.grad(lambda p, z: jnp.sum(fn(p, z) ** 2), (0, 1)))(bf(p), bf(z))
    for a in jax.tree.leaves(g):
        assert a.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(a)))


def test_mixed_dtypes_promote_and_gradients_keep_input_dtypes():
    _, _, p, z = _setup("conv1d", seed=7)
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p)
    assert jb.conv1d(p32, z).dtype == jnp.float64                 # z is float64
    g = jax.grad(lambda p, z: jnp.sum(jb.conv1d(p, z)), (0, 1))(p32, z)
    assert g[0]["w"].dtype == jnp.float32 and g[1].dtype == jnp.float64


# --- validation, eager and under jit ---------------------------------------------------
def _p(w_shape, b_shape=()):
    return {"w": jnp.ones(w_shape), "b": jnp.ones(b_shape)}


@pytest.mark.parametrize("fn, params, z, exc, match", [
    (jb.conv1d_s, _p((4,)), jnp.ones(7), ValueError, r"k=4.*must be odd"),
    (jb.conv1d_s, _p((0,)), jnp.ones(7), ValueError, r"k=0.*must be odd"),
    (jb.conv1d_s, {"w": jnp.ones(3), "bias": jnp.ones(())}, jnp.ones(7), ValueError,
     r"missing \['b'\].*unknown \['bias'\]"),
    (jb.conv1d_s, _p((3, 1)), jnp.ones(7), ValueError, r"params\['w'\] must have 1"),
    (jb.conv1d_s, _p((3,), (1,)), jnp.ones(7), ValueError, r"params\['b'\] must have shape \(\)"),
    (jb.conv1d_s, _p((3,)), jnp.ones(7, jnp.int32), TypeError, "z must be a floating"),
    (jb.conv1d_s, _p((3,)), jnp.ones(()), ValueError, "z must have at least 1"),
    (jb.conv1d_s, [jnp.ones(3)], jnp.ones(7), TypeError, "params must be a dict"),
    (jb.conv1d, _p((3, 2, 4), (4,)), jnp.ones((7, 3)), ValueError, r"\(3, 2, 4\).*\(7, 3\)"),
    (jb.conv1d, _p((2, 2, 4), (4,)), jnp.ones((7, 2)), ValueError, r"k=2.*must be odd"),
    (jb.conv1d, _p((3, 2, 4), (3,)), jnp.ones((7, 2)), ValueError,
     r"params\['b'\] must have shape \(4,\)"),
    (jb.conv1d, _p((3, 2), (2,)), jnp.ones((7, 2)), ValueError, r"params\['w'\] must have 3"),
    (jb.conv1d, _p((3, 2, 4), (4,)), jnp.ones(2), ValueError, "z must have at least 2"),
    (jb.conv2d_s, _p((3, 5)), jnp.ones((5, 7)), ValueError, r"\(3, 5\).*rectangular.*square"),
    (jb.conv2d_s, _p((4, 4)), jnp.ones((5, 7)), ValueError, r"k=4.*must be odd"),
    (jb.conv2d_s, _p((3, 3)), jnp.ones((5, 7), jnp.int32), TypeError, "z must be a floating"),
    (jb.conv2d_s, _p((3,)), jnp.ones((5, 7)), ValueError, r"params\['w'\] must have 2"),
    (jb.conv2d, _p((3, 5, 2, 4), (4,)), jnp.ones((5, 7, 2)), ValueError, "rectangular"),
    (jb.conv2d, _p((3, 3, 2, 4), (4,)), jnp.ones((5, 7, 3)), ValueError,
     r"\(3, 3, 2, 4\).*\(5, 7, 3\)"),
    (jb.conv2d, _p((3, 3, 2, 4), ()), jnp.ones((5, 7, 2)), ValueError, r"params\['b'\]"),
    (jb.conv2d, _p((3, 3, 2, 4), (4,)), jnp.ones((5, 7)), ValueError, r"\(5, 7\)"),
    (jb.conv2d, _p((3, 3, 2, 4), (4,)), jnp.ones(7), ValueError, "z must have at least 3"),
])
def test_bad_input(fn, params, z, exc, match):
    with pytest.raises(exc, match=match):
        fn(params, z)
    with pytest.raises(exc, match=match):   # at trace time, under jit as well
        jax.jit(fn)(params, z)

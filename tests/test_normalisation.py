"""Layer norm and RMSNorm beyond the registry's cases (tests/test_registry.py verifies LN-S, and LN with
both parameters per-feature or both scalar, at the default ε in float32 and float64): other ε
(0 among them), mixed parameter shapes, the backward formulas, invariances, batching design,
extreme inputs, dtypes and bad input."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from jbackprop.testing import assert_vjp_correct
from helpers import U32, U_BF16, cast, max_abs

M = 5
F64 = {"rtol": 1e-12, "atol": 1e-12}   # float64: hand-written vs autodiff of the reference


def _z(shape=(M,), seed=0, scale=1.0, shift=0.0):
    return shift + scale * jax.random.normal(jax.random.PRNGKey(seed), shape)


def _params(gamma_shape=(M,), beta_shape=(M,), seed=1):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"beta": jax.random.normal(k1, beta_shape),
            "gamma": 1.0 + 0.5 * jax.random.normal(k2, gamma_shape)}


# --- through the library's checker (autodiff of the reference, finite differences, Taylor,
# adjoint, linearity, jit, vmap, reverse-over-reverse), where the registry does not go --------
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_layer_norm_s_other_eps(eps):
    """ε = 0 (pure standardisation) and a large ε = 0.3, rows of a (4, 5) batch."""
    assert_vjp_correct(lambda z: jb.layer_norm_s(z, eps=eps), _z((4, M)),
                       reference=lambda z: ref.layer_norm_s(z, eps=eps),
                       name=f"layer_norm_s eps={eps}")


@pytest.mark.parametrize("gamma_shape, beta_shape, eps", [((), (M,), 1e-5), ((M,), (), 1e-5),
                                                          ((M,), (M,), 0.1)])
def test_layer_norm_mixed_parameter_shapes_and_eps(gamma_shape, beta_shape, eps):
    """A scalar γ with a per-feature β and the other way round (B[LN, ·] sums over the
    features for the scalar one), and ε = 0.1."""
    assert_vjp_correct(lambda p, z: jb.layer_norm(p, z, eps=eps), _params(gamma_shape, beta_shape),
                       _z((3, M), seed=2), reference=lambda p, z: ref.layer_norm(p, z, eps=eps),
                       name=f"layer_norm γ{gamma_shape} β{beta_shape} eps={eps}")


@pytest.mark.parametrize("gamma_shape", [(), (M,)])
def test_layer_norm_backward_formulas(gamma_shape):
    """B[LN, z](v) = Jᵀv with the explicit Jacobian ∂x̂_i/∂z_j = (δ_ij − 1/m − x̂_i x̂_j/m)/σ̂,
    B[LN, γ](v) = Σ v ⊙ x̂ and B[LN, β](v) = Σ v summed over the batch (and the features for a
    scalar parameter), all in NumPy from the definitions."""
    eps = 0.1
    p = _params(gamma_shape, gamma_shape)
    Z, V = _z((2, 3, M), seed=2), _z((2, 3, M), seed=3)
    p_bar, z_bar = jb.backward(jb.layer_norm)(p, Z, V, eps=eps)
    z, v, gamma = np.asarray(Z), np.asarray(V), np.asarray(p["gamma"])
    mu = z.mean(-1, keepdims=True)
    sigma = np.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (z - mu) / sigma
    expected = np.empty_like(z)
    for idx in np.ndindex(z.shape[:-1]):
        x = xhat[idx]
        jac = (np.eye(M) - 1 / M - np.outer(x, x) / M) / sigma[idx]   # ∂x̂/∂z
        expected[idx] = jac.T @ (np.broadcast_to(gamma, (M,)) * v[idx])  # (γ-scaled) Jᵀ v
    chex.assert_trees_all_close(z_bar, expected, **F64)
    feat = (0, 1) if gamma_shape else (0, 1, 2)
    chex.assert_trees_all_close(p_bar["gamma"], (v * xhat).sum(feat), **F64)
    chex.assert_trees_all_close(p_bar["beta"], v.sum(feat), **F64)


def test_layer_norm_s_backward_is_orthogonal_to_one_and_z():
    """With ε = 0, LN-S(z + c1) = LN-S(αz) = LN-S(z): so B[LN-S, z](v) ⊥ 1 and ⊥ z."""
    z, v = _z((4, M), seed=4), _z((4, M), seed=5)
    (z_bar,) = jb.backward(jb.layer_norm_s)(z, v, eps=0.0)
    scale = float(jnp.abs(z_bar).max()) * M          # rounding of a sum of M such terms
    np.testing.assert_allclose(z_bar.sum(-1), 0.0, atol=1e-15 * scale)
    np.testing.assert_allclose(jnp.sum(z_bar * z, -1), 0.0,
                               atol=1e-15 * scale * float(jnp.abs(z).max()))


@pytest.mark.parametrize("alpha", [0.01, 0.5, 3.0, 1e4])
def test_scale_invariance_7_42(alpha):
    """LN(MM_{αW,αb}(z)) = LN(MM_{W,b}(z)) (7.42): exactly for ε = 0, up to ε otherwise; and in
    the backward sense: the same z-gradient, and a W-gradient at αW that is 1/α times that at
    W (J(αW) = J(W) for all α: differentiate both sides)."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(6), 3)
    mm_p = {"W": jax.random.normal(k1, (M, 3)), "b": jax.random.normal(k2, (M,))}
    scaled = jax.tree.map(lambda a: alpha * a, mm_p)
    z, ln_p, c = jax.random.normal(k3, (3,)), _params(), _z(seed=7)
    net = lambda p, z, eps=0.0: jb.layer_norm(ln_p, jb.mm(p, z), eps=eps)
    chex.assert_trees_all_close(net(scaled, z), net(mm_p, z), rtol=1e-13, atol=1e-13)
    # with ε > 0: σ̂² + ε vs α²σ̂² + ε, a relative change of at most ~ε/min(σ̂², α²σ̂²)
    var = float(jnp.var(jb.mm(mm_p, z)))
    rel = 1e-5 / min(var, alpha ** 2 * var)
    chex.assert_trees_all_close(net(scaled, z, 1e-5), net(mm_p, z, 1e-5), rtol=rel,
                                atol=rel * max_abs(net(mm_p, z, 1e-5)))

    J = lambda p, z: jnp.sum(c * net(p, z))
    (gp_a, gz_a), (gp_1, gz_1) = jax.grad(J, (0, 1))(scaled, z), jax.grad(J, (0, 1))(mm_p, z)
    chex.assert_trees_all_close(gz_a, gz_1, **F64)
    chex.assert_trees_all_close(jax.tree.map(lambda g: alpha * g, gp_a), gp_1, **F64)


@pytest.mark.parametrize("gamma_shape", [(), (M,)])
def test_rms_norm_backward_closed_form(gamma_shape):
    """B[RMS, z](v) = Jᵀv with the explicit Jacobian ∂y_i/∂z_j = γ_i (r δ_ij − r³ z_i z_j / m),
    r = 1/√(mean z² + ε), and B[RMS, γ](v) = Σ v ⊙ x̂ summed over the batch (and the features
    for a scalar γ), in NumPy from the definitions."""
    eps = 0.1
    p = {"gamma": _params(gamma_shape, gamma_shape)["gamma"]}
    Z, V = _z((2, 3, M), seed=13), _z((2, 3, M), seed=14)
    p_bar, z_bar = jb.backward(jb.rms_norm)(p, Z, V, eps=eps)
    z, v, gamma = np.asarray(Z), np.asarray(V), np.broadcast_to(np.asarray(p["gamma"]), (M,))
    r = 1 / np.sqrt((z ** 2).mean(-1, keepdims=True) + eps)
    expected = np.empty_like(z)
    for idx in np.ndindex(z.shape[:-1]):
        jac = gamma[:, None] * (r[idx] * np.eye(M) - r[idx] ** 3 * np.outer(z[idx], z[idx]) / M)
        expected[idx] = jac.T @ v[idx]
    chex.assert_trees_all_close(z_bar, expected, **F64)
    feat = (0, 1) if gamma_shape else (0, 1, 2)
    chex.assert_trees_all_close(p_bar["gamma"], (v * z * r).sum(feat), **F64)


@pytest.mark.parametrize("alpha", [1e-3, 0.5, 7.0, -2.0])
def test_rms_norm_scale_invariance(alpha):
    """With ε = 0, RMS(αz) = sign(α) RMS(z), so ⟨B[RMS, z](v), z⟩ = 0 and (differentiating
    both sides) the gradient at αz is 1/|α| times that at z; with ε > 0,
    ⟨B[RMS, z](v), z⟩ = ⟨g, x̂⟩(1 − r²‖z‖²/m), g = γ ⊙ v (docs/normalisation.md)."""
    p, z, v = {"gamma": _params()["gamma"]}, _z((4, M), seed=15), _z((4, M), seed=16)
    f = lambda z, eps=0.0: jb.rms_norm(p, z, eps=eps)
    chex.assert_trees_all_close(f(alpha * z), np.sign(alpha) * f(z), **F64)
    (_, z_bar) = jb.backward(jb.rms_norm)(p, z, v, eps=0.0)
    np.testing.assert_allclose(jnp.sum(z_bar * z, -1), 0.0,
                               atol=1e-14 * M * max_abs(z_bar) * max_abs(z))
    (_, z_bar_a) = jb.backward(jb.rms_norm)(p, alpha * z, v, eps=0.0)
    chex.assert_trees_all_close(z_bar_a, z_bar / abs(alpha), **F64)
    eps = 0.3
    (_, z_bar) = jb.backward(jb.rms_norm)(p, z, v, eps=eps)
    r = 1 / jnp.sqrt(jnp.mean(z ** 2, -1) + eps)
    g_xhat = jnp.sum(p["gamma"] * v * z, -1) * r
    chex.assert_trees_all_close(jnp.sum(z_bar * z, -1),
                                g_xhat * (1 - r ** 2 * jnp.sum(z ** 2, -1) / M), **F64)


@pytest.mark.parametrize("params, z, exc, match", [
    ({"gamma": jnp.ones(4)}, jnp.ones(3), ValueError, r"params\['gamma'\] must have shape \(\) or \(3,\)"),
    ({"gamma": jnp.ones(3), "beta": jnp.ones(3)}, jnp.ones(3), ValueError, r"unknown \['beta'\]"),
    ({"gamma": jnp.ones(3)}, jnp.ones(()), ValueError, "z must have at least 1"),
    ({"gamma": jnp.ones(3)}, jnp.ones(3, jnp.int32), TypeError, "z must be a floating"),
])
def test_rms_norm_bad_input(params, z, exc, match):
    with pytest.raises(exc, match=match):
        jax.jit(jb.rms_norm)(params, z)

def test_layer_norm_vmap_calls_the_core_once_on_the_batch():
    p, Z = _params(), _z((8, M), seed=8)
    f = jax.vmap(lambda z: jb.layer_norm(p, z))
    assert "jbackprop_call" in str(jax.make_jaxpr(f)(Z))        # one call, batch axis leading
    g = jax.grad(lambda p: jnp.sum(jnp.sin(jax.vmap(lambda z: jb.layer_norm(p, z))(Z))))(p)
    gr = jax.grad(lambda p: jnp.sum(jnp.sin(jax.vmap(lambda z: ref.layer_norm(p, z))(Z))))(p)
    chex.assert_trees_all_close(g, gr, **F64)
    chex.assert_trees_all_close(jb.layer_norm(p, Z), f(Z), rtol=1e-14, atol=1e-14)


def test_layer_norm_vmap_over_params_falls_back():
    ps = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), _params())
    z = _z()
    chex.assert_trees_all_close(jax.vmap(jb.layer_norm, (0, None))(ps, z),
                                jax.vmap(ref.layer_norm, (0, None))(ps, z), **F64)
    J = lambda f: lambda ps: jnp.sum(jnp.sin(jax.vmap(f, (0, None))(ps, z)))
    chex.assert_trees_all_close(jax.grad(J(jb.layer_norm))(ps), jax.grad(J(ref.layer_norm))(ps),
                                **F64)


@pytest.mark.parametrize("z", [
    jnp.full((M,), 3.0),                          # constant: σ̂ = √ε
    jnp.full((M,), 1e8),
    _z(scale=1e-8, shift=1.0),                    # spread 1e-8 ≪ √ε
    _z(scale=1e8, shift=-3e8),                    # spread 1e8
], ids=["constant", "constant-1e8", "spread-1e-8", "spread-1e8"])
def test_layer_norm_extreme_inputs_are_finite_and_correct(z):
    p = _params()
    out = jb.layer_norm(p, z)
    c = _z(seed=9)
    g = jax.grad(lambda p, z: jnp.sum(c * jb.layer_norm(p, z)), (0, 1))(p, z)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves((out, g)))
    chex.assert_trees_all_close(out, ref.layer_norm(p, z), **F64)
    g_ref = jax.grad(lambda p, z: jnp.sum(c * ref.layer_norm(p, z)), (0, 1))(p, z)
    chex.assert_trees_all_close(g, g_ref, **F64)
    f32 = lambda a: jax.tree.map(lambda x: x.astype(jnp.float32), a)
    out32, g32 = jb.layer_norm(f32(p), f32(z)), jax.grad(
        lambda p, z: jnp.sum(c.astype(jnp.float32) * jb.layer_norm(p, z)), (0, 1))(f32(p), f32(z))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves((out32, g32)))


def test_layer_norm_constant_vector():
    """A constant row: x̂ = 0, so LN = β, B[LN, γ] = 0, and B[LN, z](v) = (g − mean(g))/√ε."""
    p, v = _params(), _z(seed=10)
    z = jnp.full((M,), -2.5)
    (p_bar, z_bar) = jb.backward(jb.layer_norm)(p, z, v)
    chex.assert_trees_all_close(jb.layer_norm(p, z), p["beta"], rtol=1e-15, atol=1e-15)
    chex.assert_trees_all_equal(p_bar["gamma"], jnp.zeros(M))
    g = p["gamma"] * v
    chex.assert_trees_all_close(z_bar, (g - g.mean()) / jnp.sqrt(1e-5), rtol=1e-13, atol=0)


def test_eps_zero_constant_vector_divides_by_zero():
    """Documented: eps=0 on a constant row is 0/0."""
    assert bool(jnp.all(jnp.isnan(jb.layer_norm_s(jnp.ones(M), eps=0.0))))


def test_layer_norm_float32_close_to_float64():
    """Float32 output and cotangents against the exact ones: the float64 reference and its
    ``jax.grad`` at the same float32 numbers. x̂ = (z − μ)/σ̂ is conditioned by
    κ = max|z|/σ̂ (the centring cancels): μ and σ̂² are sums of m terms, so x̂'s float32 error
    is at most about (m + 3)κu. The output γx̂ + β and the backward's terms (g, mean g,
    x̂ mean(g x̂), Σ v x̂) carry that error at most four times over: (4(m + 3)κu) of the scale."""
    p, z, c = cast((_params(), _z((3, M), seed=11), _z((3, M), seed=12)), jnp.float32)
    J = lambda f: lambda p, z: jnp.sum(c.astype(z.dtype) * f(p, z))
    out32, g32 = jb.layer_norm(p, z), jax.grad(J(jb.layer_norm), (0, 1))(p, z)
    chex.assert_type([out32, *jax.tree.leaves(g32)], jnp.float32)
    p64, z64 = cast((p, z), jnp.float64)                                   # the same numbers
    expected = (ref.layer_norm(p64, z64), jax.grad(J(ref.layer_norm), (0, 1))(p64, z64))
    sigma = jnp.sqrt(jnp.var(z64, axis=-1) + 1e-5)
    kappa = float(jnp.max(jnp.max(jnp.abs(z64), axis=-1) / sigma))
    chex.assert_trees_all_close((out32, g32), expected, rtol=0,
                                atol=4 * (M + 3) * kappa * U32 * max_abs(expected))


def test_layer_norm_bfloat16_runs():
    """bfloat16 in and out, statistics in float32: the output is x̂ rounded to bfloat16, times γ,
    plus β: three roundings of terms of magnitude at most S = max|γ||x̂| + max|β|, so within
    3uS of the float64 reference at the same numbers (u = 2⁻⁹; float32's error in x̂, about
    (m + 3)κ 2⁻²⁴ with κ ≈ 12 here, is far below). Gradients run and are finite."""
    p, z = cast((_params(), _z((3, M), scale=100.0, shift=1e3)), jnp.bfloat16)
    J = lambda p, z: jnp.sum(jb.layer_norm(p, z) ** 2)
    out, (gp, gz) = jax.jit(jb.layer_norm)(p, z), jax.jit(jax.grad(J, (0, 1)))(p, z)
    chex.assert_type([out, *jax.tree.leaves((gp, gz))], jnp.bfloat16)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves((out, gp, gz)))
    p64, z64 = cast((p, z), jnp.float64)
    xhat = ref.layer_norm_s(z64)
    S = max_abs(p64["gamma"]) * max_abs(xhat) + max_abs(p64["beta"])
    chex.assert_trees_all_close(out, ref.layer_norm(p64, z64), rtol=0, atol=3 * U_BF16 * S)
    s = jb.layer_norm_s(z)                       # x̂ in float32 (error ≲ (m + 3)κ 2⁻²⁴), rounded
    chex.assert_type(s, jnp.bfloat16)
    kappa = max_abs(z64) / float(jnp.min(jnp.sqrt(jnp.var(z64, axis=-1) + 1e-5)))
    chex.assert_trees_all_close(s, xhat, rtol=U_BF16, atol=(M + 3) * kappa * U32)


def test_mixed_dtypes():
    """z float32 with float64 parameters: the output is promoted; each cotangent keeps the
    dtype of its argument."""
    p = {"beta": jnp.zeros(()), "gamma": jnp.ones(M, jnp.float32)}
    z = _z().astype(jnp.float32)
    chex.assert_type(jb.layer_norm(p, z), jnp.float64)
    gp, gz = jax.grad(lambda p, z: jnp.sum(jb.layer_norm(p, z) ** 3), (0, 1))(p, z)
    chex.assert_type([gz, gp["beta"], gp["gamma"]], [jnp.float32, jnp.float64, jnp.float32])


@pytest.mark.parametrize("params, z, exc, match", [
    (_params(), jnp.ones(()), ValueError, "z must have at least 1"),
    (_params(), jnp.ones(M, jnp.int32), TypeError, "z must be a floating"),
    (_params(), jnp.ones((2, 0)), ValueError, r"must not be empty, got shape \(2, 0\)"),
    (_params((M + 1,)), jnp.ones(M), ValueError,
     r"params\['gamma'\] must have shape \(\) .* or \(5,\) .*got \(6,\)"),
    (_params(beta_shape=(1, M)), jnp.ones(M), ValueError, r"params\['beta'\].*got \(1, 5\)"),
    ({"beta": 0.0, "scale": 1.0}, jnp.ones(M), ValueError,
     r"missing \['gamma'\].*unknown \['scale'\]"),
    ([0.0, 1.0], jnp.ones(M), TypeError, "params must be a dict"),
    ({"beta": 0.0, "gamma": jnp.ones(M, jnp.int32)}, jnp.ones(M), TypeError,
     r"params\['gamma'\] must be a floating"),
])
def test_layer_norm_bad_input(params, z, exc, match):
    with pytest.raises(exc, match=match):
        jb.layer_norm(params, z)
    with pytest.raises(exc, match=match):   # at trace time, under jit as well
        jax.jit(jb.layer_norm)(params, z)


@pytest.mark.parametrize("z, eps, exc, match", [
    (jnp.ones(()), 1e-5, ValueError, "z must have at least 1"),
    (jnp.ones(M, jnp.int32), 1e-5, TypeError, "z must be a floating"),
    (jnp.ones(M), -1.0, ValueError, "eps must be a finite number ≥ 0"),
    (jnp.ones(M), float("nan"), ValueError, "eps must be a finite number ≥ 0"),
])
def test_layer_norm_s_bad_input(z, eps, exc, match):
    with pytest.raises(exc, match=match):
        jb.layer_norm_s(z, eps=eps)
    with pytest.raises(exc, match=match):   # at trace time, under jit as well
        jax.jit(jb.layer_norm_s, static_argnames="eps")(z, eps=eps)


def test_layer_norm_s_eps_must_be_static():
    """A JAX array ε (which could not be a static argument of jit either) is refused."""
    with pytest.raises(TypeError, match="eps must be a Python number"):
        jb.layer_norm_s(jnp.ones(M), eps=jnp.array(1e-5))

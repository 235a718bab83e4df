import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from helpers import assert_close, check_module

M = 5


def _z(shape=(M,), seed=0, scale=1.0, shift=0.0):
    return shift + scale * jax.random.normal(jax.random.PRNGKey(seed), shape)


def _params(gamma_shape=(M,), beta_shape=(M,), seed=1):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"beta": jax.random.normal(k1, beta_shape),
            "gamma": 1.0 + 0.5 * jax.random.normal(k2, gamma_shape)}


@pytest.mark.parametrize("eps", [1e-5, 0.3])
def test_layer_norm_s_against_reference(eps):
    check_module(jb.layer_norm_s, ref.layer_norm_s, (_z(),), kwargs={"eps": eps}, batch=(0,))


def test_layer_norm_s_leading_axes():
    check_module(jb.layer_norm_s, ref.layer_norm_s, (_z((2, 3, M)),))


@pytest.mark.parametrize("gamma_shape, beta_shape", [((), ()), ((M,), (M,)), ((), (M,))])
def test_layer_norm_against_reference(gamma_shape, beta_shape):
    check_module(jb.layer_norm, ref.layer_norm, (_params(gamma_shape, beta_shape), _z()),
                 batch=(1,))


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
    assert_close(z_bar, expected)
    feat = (0, 1) if gamma_shape else (0, 1, 2)
    assert_close(p_bar["gamma"], (v * xhat).sum(feat))
    assert_close(p_bar["beta"], v.sum(feat))


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
    assert_close(net(scaled, z), net(mm_p, z), 1e-13)
    # with ε > 0: σ̂² + ε vs α²σ̂² + ε, a relative change of at most ~ε/min(σ̂², α²σ̂²)
    var = float(jnp.var(jb.mm(mm_p, z)))
    assert_close(net(scaled, z, 1e-5), net(mm_p, z, 1e-5), 1e-5 / min(var, alpha ** 2 * var))

    J = lambda p, z: jnp.sum(c * net(p, z))
    (gp_a, gz_a), (gp_1, gz_1) = jax.grad(J, (0, 1))(scaled, z), jax.grad(J, (0, 1))(mm_p, z)
    assert_close(gz_a, gz_1, 1e-12)
    assert_close(jax.tree.map(lambda g: alpha * g, gp_a), gp_1, 1e-12)


def test_layer_norm_vmap_calls_the_core_once_on_the_batch():
    p, Z = _params(), _z((8, M), seed=8)
    f = jax.vmap(lambda z: jb.layer_norm(p, z))
    assert "jbackprop_call" in str(jax.make_jaxpr(f)(Z))        # one call, batch axis leading
    g = jax.grad(lambda p: jnp.sum(jnp.sin(jax.vmap(lambda z: jb.layer_norm(p, z))(Z))))(p)
    gr = jax.grad(lambda p: jnp.sum(jnp.sin(jax.vmap(lambda z: ref.layer_norm(p, z))(Z))))(p)
    assert_close(g, gr)
    assert_close(jb.layer_norm(p, Z), f(Z), 1e-14)


def test_layer_norm_vmap_over_params_falls_back():
    ps = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), _params())
    z = _z()
    assert_close(jax.vmap(jb.layer_norm, (0, None))(ps, z),
                 jax.vmap(ref.layer_norm, (0, None))(ps, z), 1e-12)
    J = lambda f: lambda ps: jnp.sum(jnp.sin(jax.vmap(f, (0, None))(ps, z)))
    assert_close(jax.grad(J(jb.layer_norm))(ps), jax.grad(J(ref.layer_norm))(ps))


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
    assert_close(out, ref.layer_norm(p, z), 1e-12)
    assert_close(g, jax.grad(lambda p, z: jnp.sum(c * ref.layer_norm(p, z)), (0, 1))(p, z))
    f32 = lambda a: jax.tree.map(lambda x: x.astype(jnp.float32), a)
    out32, g32 = jb.layer_norm(f32(p), f32(z)), jax.grad(
        lambda p, z: jnp.sum(c.astype(jnp.float32) * jb.layer_norm(p, z)), (0, 1))(f32(p), f32(z))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves((out32, g32)))


def test_layer_norm_constant_vector():
    """A constant row: x̂ = 0, so LN = β, B[LN, γ] = 0, and B[LN, z](v) = (g − mean(g))/√ε."""
    p, v = _params(), _z(seed=10)
    z = jnp.full((M,), -2.5)
    (p_bar, z_bar) = jb.backward(jb.layer_norm)(p, z, v)
    assert_close(jb.layer_norm(p, z), p["beta"], 1e-15)
    assert_close(p_bar["gamma"], jnp.zeros(M))
    g = p["gamma"] * v
    assert_close(z_bar, (g - g.mean()) / jnp.sqrt(1e-5))


def test_eps_zero_constant_vector_divides_by_zero():
    """Documented: eps=0 on a constant row is 0/0."""
    assert bool(jnp.all(jnp.isnan(jb.layer_norm_s(jnp.ones(M), eps=0.0))))


def test_layer_norm_float32_close_to_float64():
    p, z, c = _params(), _z((3, M), seed=11), _z((3, M), seed=12)
    J = lambda p, z: jnp.sum(c.astype(z.dtype) * jb.layer_norm(p, z))
    f32 = lambda a: jax.tree.map(lambda x: x.astype(jnp.float32), a)
    out32, g32 = jb.layer_norm(f32(p), f32(z)), jax.grad(J, (0, 1))(f32(p), f32(z))
    assert out32.dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g32))
    assert_close(out32, jb.layer_norm(p, z), 1e-4)
    assert_close(g32, jax.grad(J, (0, 1))(p, z), 1e-4)


def test_layer_norm_bfloat16_runs():
    bf = lambda a: jax.tree.map(lambda x: x.astype(jnp.bfloat16), a)
    p, z = bf(_params()), bf(_z((3, M), scale=100.0, shift=1e3))
    J = lambda p, z: jnp.sum(jb.layer_norm(p, z) ** 2)
    out, (gp, gz) = jax.jit(jb.layer_norm)(p, z), jax.jit(jax.grad(J, (0, 1)))(p, z)
    for a in jax.tree.leaves((out, gp, gz)):
        assert a.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(a)))
    assert_close(out, jb.layer_norm(jax.tree.map(lambda x: x.astype(jnp.float64), p),
                                    z.astype(jnp.float64)), 1e-2)   # bf16 output rounding 2^-8
    s = jb.layer_norm_s(z)
    assert s.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(s)))


def test_mixed_dtypes():
    """z float32 with float64 parameters: the output is promoted; each cotangent keeps the
    dtype of its argument."""
    p = {"beta": jnp.zeros(()), "gamma": jnp.ones(M, jnp.float32)}
    z = _z().astype(jnp.float32)
    assert jb.layer_norm(p, z).dtype == jnp.float64
    gp, gz = jax.grad(lambda p, z: jnp.sum(jb.layer_norm(p, z) ** 3), (0, 1))(p, z)
    assert gz.dtype == jnp.float32 and gp["beta"].dtype == jnp.float64
    assert gp["gamma"].dtype == jnp.float32


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
    (jnp.ones(M), -1.0, ValueError, r"eps must be in \[0"),
    (jnp.ones(M), jnp.array(1e-5), TypeError, "eps must be a Python number"),
])
def test_layer_norm_s_bad_input(z, eps, exc, match):
    with pytest.raises(exc, match=match):
        jb.layer_norm_s(z, eps=eps)
    if not isinstance(eps, jax.Array):
        with pytest.raises(exc, match=match):
            jax.jit(jb.layer_norm_s, static_argnames="eps")(z, eps=eps)

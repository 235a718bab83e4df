"""Losses beyond the registry's cases (tests/test_registry.py verifies MSE and cross-entropy on
vectors, and the logistic loss with float labels 0 or 1 that are not differentiated, in float32
and float64): scalars, soft labels differentiated, integer and boolean labels, extreme classes,
leading batch axes, closed forms, stability, dtypes and bad input."""
import math

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
EXACT = {"rtol": 1e-14, "atol": 1e-14}  # float64: a closed form with the same few operations
T3 = jnp.array([0.7, -1.2, 2.0])                  # a vector output / logits, k = 3
Y3 = jnp.array([0.5, 0.1, -0.4])


def _softmax(t):
    e = np.exp(np.asarray(t) - np.max(t, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _vmapped(fn, times):
    """``fn`` mapped over ``times`` leading axes of both arguments."""
    for _ in range(times):
        fn = jax.vmap(fn)
    return fn


# --- through the library's checker (autodiff of the reference, finite differences, Taylor,
# adjoint, linearity, jit, vmap, reverse-over-reverse), where the registry does not go --------
def test_mse_scalar_and_leading_batch_axes():
    """A scalar output, and (2, 4) examples of (3,) outputs at once (per-example losses), both
    arguments differentiated."""
    assert_vjp_correct(jb.mse_loss, jnp.float64(0.7), jnp.float64(-0.2), reference=ref.mse_loss)
    T = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 3)))
    Y = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 3)))
    assert_vjp_correct(jb.mse_loss, T, Y, reference=_vmapped(ref.mse_loss, 2), name="mse (2, 4)")


def test_logistic_soft_labels_differentiated():
    """Soft float labels in (0, 1) are differentiable arguments: B[ℓ, y](v) = −t v."""
    t = jnp.array([-0.8, 0.4, 1.7, -2.2])
    y = jnp.array([0.3, 0.5, 0.6, 0.45])
    assert_vjp_correct(jb.logistic_loss, t, y, reference=ref.logistic_loss, argnums=(0, 1))


@pytest.mark.parametrize("y", [jnp.array([1, 0, 1], jnp.int32), jnp.array([0, 0, 1], jnp.int64),
                               jnp.array([True, False, False])], ids=["int32", "int64", "bool"])
def test_logistic_integer_and_bool_labels(y):
    """Integer and boolean labels (cast to t's dtype inside): t differentiated, the labels
    batched with t in the vmap check."""
    assert_vjp_correct(jb.logistic_loss, jnp.array([-0.8, 0.4, 1.7]), y,
                       reference=ref.logistic_loss, batch_argnums=(0, 1))


@pytest.mark.parametrize("y", [0, 2], ids=["y=0", "y=2"])
def test_cross_entropy_first_and_last_class(y):
    """The registry's labels are the middle class; here the first and the last."""
    assert_vjp_correct(jb.cross_entropy_loss, T3, jnp.int32(y), reference=ref.cross_entropy_loss,
                       batch_argnums=(0, 1))


# --- the backward formulas as closed forms ------------------------------------------------
def test_backward_formulas():
    """B[ℓ_MSE, t](v) = (t − y)v, B[ℓ_MSE, y](v) = −(t − y)v; B[ℓ_logistic, t](v) = (σ(t) − y)v,
    B[ℓ_logistic, y](v) = −tv; B[ℓ_ce, t](v) = (softmax(t) − e_y)v; integer labels: None."""
    v = jnp.float64(-1.7)
    t_bar, y_bar = jb.backward(jb.mse_loss)(T3, Y3, v)
    chex.assert_trees_all_close(t_bar, (T3 - Y3) * v, **EXACT)
    chex.assert_trees_all_close(y_bar, -(T3 - Y3) * v, **EXACT)

    t, y = jnp.float64(0.9), jnp.float64(0.25)
    t_bar, y_bar = jb.backward(jb.logistic_loss)(t, y, v)
    chex.assert_trees_all_close(t_bar, (1 / (1 + math.exp(-0.9)) - 0.25) * v, **EXACT)
    chex.assert_trees_all_close(y_bar, -t * v, **EXACT)
    t_bar, y_bar = jb.backward(jb.logistic_loss)(t, jnp.int32(1), v)
    chex.assert_trees_all_close(t_bar, (1 / (1 + math.exp(-0.9)) - 1) * v, **EXACT)
    assert y_bar is None

    t_bar, y_bar = jb.backward(jb.cross_entropy_loss)(T3, jnp.int32(1), v)
    chex.assert_trees_all_close(t_bar, (_softmax(T3) - np.eye(3)[1]) * float(v), **EXACT)
    assert y_bar is None


def test_leading_batch_axes_give_per_example_losses():
    key = jax.random.split(jax.random.PRNGKey(0), 3)
    T = jax.random.normal(key[0], (2, 4, 3))
    Yf = jax.random.normal(key[1], (2, 4, 3))
    Yc = jax.random.randint(key[2], (2, 4), 0, 3)
    cases = [(jb.mse_loss, ref.mse_loss, Yf, 2),                 # vectors (3,): batch (2, 4)
             (jb.cross_entropy_loss, ref.cross_entropy_loss, Yc, 2),  # logits (3,)
             (jb.logistic_loss, ref.logistic_loss, jax.nn.sigmoid(Yf), 3)]  # scalar logits
    for fn, r, y, batch_ndim in cases:
        r_b = _vmapped(r, batch_ndim)
        out = fn(T, y)
        chex.assert_shape(out, T.shape[:batch_ndim])
        chex.assert_trees_all_close(out, r_b(T, y), **F64)
        # the dataset loss is the mean over examples (7.2), taken by the user
        g = jax.grad(lambda t: jnp.mean(fn(t, y)))(T)
        chex.assert_trees_all_close(g, jax.grad(lambda t: jnp.mean(r_b(t, y)))(T), **F64)


def test_worked_example_regularised_single_unit():
    """SPEC: z = wx + b, y = σ(z), L = ½(y − t)², R = ½w², E = L + λR ⇒ ȳ = y − t,
    z̄ = ȳ σ'(z), w̄ = z̄ x + λ w, b̄ = z̄ — backward pass in the notes' form, module by module."""
    x, w, b, t, lam = 1.5, -0.8, 0.3, 0.25, 0.1
    params, xv, tv = {"W": jnp.array([[w]]), "b": jnp.array([b])}, jnp.array([x]), jnp.array([t])
    z = jb.mm(params, xv)                                       # forward, keeping z and y
    y = jb.sigmoid(z)
    E = jb.mse_loss(y, tv) + lam * 0.5 * params["W"][0, 0] ** 2
    (y_bar, _) = jb.backward(jb.mse_loss)(y, tv, jnp.float64(1.0))   # B[ℓ, y](1)
    (z_bar,) = jb.backward(jb.sigmoid)(z, y_bar)                     # B[σ, z](ȳ)
    p_bar, _ = jb.backward(jb.mm)(params, xv, z_bar)                 # B[MM, θ](z̄)
    w_bar = p_bar["W"] + lam * params["W"]                 # the regulariser's branch adds λw

    s = 1 / (1 + math.exp(-(w * x + b)))                                  # closed form
    ybar_c = s - t
    zbar_c = ybar_c * s * (1 - s)
    chex.assert_trees_all_close(E, 0.5 * (s - t) ** 2 + lam * 0.5 * w ** 2, **EXACT)
    chex.assert_trees_all_close(y_bar, jnp.array([ybar_c]), **EXACT)
    chex.assert_trees_all_close(z_bar, jnp.array([zbar_c]), **EXACT)
    chex.assert_trees_all_close(w_bar, jnp.array([[zbar_c * x + lam * w]]), **EXACT)
    chex.assert_trees_all_close(p_bar["b"], jnp.array([zbar_c]), **EXACT)
    g = jax.grad(lambda p: jb.mse_loss(jb.sigmoid(jb.mm(p, xv)), tv)
                 + lam * 0.5 * jnp.sum(p["W"] ** 2))(params)
    chex.assert_trees_all_close(g, {"W": w_bar, "b": p_bar["b"]}, **F64)


# --- stability ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("big", [1e4, 1e30])
def test_logistic_extreme_logits(big, dtype):
    """ℓ(t, y) = log(1 + e^t) − y t, ∂ℓ/∂t = σ(t) − y: for |t| = 1e4 (and 1e30 in float64)
    e^{−|t|} underflows, so the float64 closed forms are exactly these numbers."""
    t = jnp.array([big, big, -big, -big], dtype)
    y = jnp.array([1, 0, 1, 0])
    loss, grad = jb.logistic_loss(t, y), jax.grad(lambda t: jnp.sum(jb.logistic_loss(t, y)))(t)
    chex.assert_type([loss, grad], dtype)
    np.testing.assert_array_equal(loss, np.array([0.0, big, big, 0.0], dtype))
    np.testing.assert_array_equal(grad, np.array([0.0, 1.0, -1.0, 0.0], dtype))


def test_logistic_no_cancellation_for_confident_predictions():
    """t = ±40 with the matching label: ℓ = log1p(e^{−40}) ≈ 4.2e-18 and ∂ℓ/∂t = ∓1/(1 + e^{40}),
    to full relative precision (log(1 + e^t) − y t would round both to 0)."""
    t, y = jnp.array([40.0, -40.0]), jnp.array([1.0, 0.0])
    e = math.exp(-40.0)
    np.testing.assert_allclose(jb.logistic_loss(t, y), [math.log1p(e)] * 2, rtol=1e-14)
    grad = jax.grad(lambda t: jnp.sum(jb.logistic_loss(t, y)))(t)
    np.testing.assert_allclose(grad, [-e / (1 + e), e / (1 + e)], rtol=1e-14)


@pytest.mark.parametrize("dtype, big", [(jnp.float32, 1e4), (jnp.float64, 1e4),
                                        (jnp.float32, 1e30), (jnp.float64, 1e30)])
def test_cross_entropy_extreme_logits(dtype, big):
    """ℓ = logsumexp(t) − t_y, ∂ℓ/∂t = softmax(t) − e_y with e^{−big} = 0: exact closed forms."""
    t = jnp.array([big, 0.0, -big], dtype)
    for y, loss_c in [(0, 0.0), (1, big), (2, 2 * big)]:
        loss, grad = jax.value_and_grad(jb.cross_entropy_loss)(t, y)
        chex.assert_type([loss, grad], dtype)
        np.testing.assert_array_equal(loss, np.asarray(loss_c, dtype))
        np.testing.assert_array_equal(grad, np.array([1.0, 0, 0], dtype) - np.eye(3)[y])
    tie = jnp.array([big, big, -big], dtype)             # two equal huge logits: log 2, ½ each
    loss, grad = jax.value_and_grad(jb.cross_entropy_loss)(tie, 1)
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-7)
    np.testing.assert_allclose(grad, [0.5, -0.5, 0.0], rtol=1e-7)


def test_float32_close_to_float64():
    """Float32 losses and cotangents against the exact values: the float64 reference (vmapped
    over the examples) and its ``jax.grad``, at the same float32 numbers. Each value comes
    from a few correctly rounded (or few-ulp: exp, log1p) operations on numbers of magnitude
    at most S = max(1, |t|, |y|): a sum of k = 4 squares, σ(t) − y, softmax − e_y,
    log(1 + e^t) − y t and logsumexp(t) − t_y, whose cancellations leave an error of a few
    round-offs u of S. 8u (relative) + 8uS (absolute) bounds that; float32's own
    representation error is u."""
    T = jax.random.normal(jax.random.PRNGKey(1), (6, 4)) * 3
    Y = jax.random.normal(jax.random.PRNGKey(2), (6, 4))
    cases = [(jb.mse_loss, ref.mse_loss, 1, T, Y, (0, 1)),           # rows of 4 outputs
             (jb.logistic_loss, ref.logistic_loss, 2, T, jax.nn.sigmoid(Y), (0, 1)),  # scalars
             (jb.cross_entropy_loss, ref.cross_entropy_loss, 1, T, jnp.array([0, 3, 1, 2, 2, 0]),
              (0,))]                                                  # rows of 4 logits
    for fn, r, batch_ndim, t, y, argnums in cases:
        t32, y32 = cast((t, y), jnp.float32)
        t64, y64 = cast((t32, y32), jnp.float64)                      # the same numbers
        r_b = _vmapped(r, batch_ndim)
        loss32 = fn(t32, y32)
        g32 = jax.grad(lambda t, y: jnp.sum(fn(t, y)), argnums)(t32, y32)
        chex.assert_type([loss32, *g32], jnp.float32)
        S = max(1.0, float(jnp.max(jnp.abs(t64))), float(jnp.max(jnp.abs(y64))))
        tol = {"rtol": 8 * U32, "atol": 8 * U32 * S}
        chex.assert_trees_all_close(loss32, r_b(t64, y64), **tol)
        exact = jax.grad(lambda t, y: jnp.sum(r_b(t, y)), argnums)(t64, y64)
        chex.assert_trees_all_close(g32, exact, **tol)


def test_bfloat16_runs():
    bf = jnp.bfloat16
    T = (jax.random.normal(jax.random.PRNGKey(3), (5, 4)) * 50).astype(bf)
    cases = [(jb.mse_loss, jnp.zeros((5, 4), bf)), (jb.logistic_loss, jnp.ones((5, 4), jnp.int32)),
             (jb.cross_entropy_loss, jnp.array([0, 1, 2, 3, 0]))]
    for fn, y in cases:
        loss = jax.jit(fn)(T, y)
        grad = jax.jit(jax.grad(lambda t: jnp.sum(fn(t, y))))(T)
        chex.assert_type([loss, grad], bf)
        assert bool(jnp.all(jnp.isfinite(loss))) and bool(jnp.all(jnp.isfinite(grad))), fn.__name__


def test_mixed_dtypes_follow_promotion():
    t, y = T3.astype(jnp.float32), Y3
    chex.assert_type(jb.mse_loss(t, y), jnp.float64)
    gt, gy = jax.grad(lambda t, y: jb.mse_loss(t, y), (0, 1))(t, y)
    chex.assert_type([gt, gy], [jnp.float32, jnp.float64])


# --- labels -------------------------------------------------------------------------------
def test_cross_entropy_label_out_of_range_concrete():
    for y in (3, -1, jnp.array([0, 5])):
        t = T3 if jnp.ndim(y) == 0 else jnp.stack([T3, T3])
        with pytest.raises(ValueError, match=r"y must be in 0\.\.2 \(the logits have 3 classes\)"):
            jb.cross_entropy_loss(t, y)


def test_concrete_labels_closed_over_by_jit_are_checked():
    """Labels that are constants of a jitted function are concrete: checked, not NaN."""
    T, bad = jnp.stack([T3, -T3]), jnp.array([0, 3])
    with pytest.raises(ValueError, match=r"y must be in 0\.\.2"):
        jax.jit(lambda t: jb.cross_entropy_loss(t, bad))(T)
    with pytest.raises(ValueError, match=r"y must be in \[0, 1\]"):
        jax.jit(lambda t: jb.logistic_loss(t, bad))(T3[:2])
    Y = jnp.array([2, 0])
    chex.assert_trees_all_close(jax.jit(lambda t: jb.cross_entropy_loss(t, Y))(T),
                                jax.vmap(ref.cross_entropy_loss)(T, Y), **F64)


def test_cross_entropy_label_out_of_range_traced_is_nan():
    """Under jit the labels are not concrete: an out-of-range label (too large, or negative,
    which indexing would wrap around) makes that example's loss and gradient NaN."""
    T = jnp.stack([T3, 2 * T3, -T3])
    Y = jnp.array([1, 3, -1])
    loss = jax.jit(jb.cross_entropy_loss)(T, Y)
    grad = jax.jit(jax.grad(lambda t, y: jnp.sum(jb.cross_entropy_loss(t, y))))(T, Y)
    chex.assert_trees_all_close(loss[0], ref.cross_entropy_loss(T3, 1), **F64)
    assert bool(jnp.all(jnp.isnan(loss[1:]))) and bool(jnp.all(jnp.isnan(grad[1:])))
    chex.assert_trees_all_close(grad[0], _softmax(T3) - np.eye(3)[1], **F64)


def test_logistic_label_out_of_range():
    with pytest.raises(ValueError, match=r"y must be in \[0, 1\].*got \[2\]"):
        jb.logistic_loss(jnp.float64(0.5), 2)
    with pytest.raises(ValueError, match=r"y must be in \[0, 1\].*got \[-0\.5\]"):
        jb.logistic_loss(jnp.ones(2), jnp.array([0.5, -0.5]))
    loss = jax.jit(jb.logistic_loss)(jnp.ones(3), jnp.array([1.0, 1.5, -0.1]))
    grad = jax.jit(jax.grad(lambda t, y: jnp.sum(jb.logistic_loss(t, y))))(
        jnp.ones(3), jnp.array([1, 2, -1]))
    assert not jnp.isnan(loss[0]) and bool(jnp.all(jnp.isnan(loss[1:])))
    assert not jnp.isnan(grad[0]) and bool(jnp.all(jnp.isnan(grad[1:])))


# --- bad input: raised at trace time, eager and under jit -----------------------------------
@pytest.mark.parametrize("fn, t, y, exc, match", [
    (jb.mse_loss, T3, jnp.ones(2), ValueError, r"shape of t \(3,\), got y \(2,\)"),
    (jb.mse_loss, T3, jnp.ones((3, 1)), ValueError, r"shape of t \(3,\), got y \(3, 1\)"),
    (jb.mse_loss, jnp.ones(3, jnp.int32), Y3, TypeError, "t must be a floating"),
    (jb.mse_loss, T3, jnp.ones(3, jnp.int32), TypeError, "y must be a floating"),
    (jb.logistic_loss, jnp.ones(3), jnp.ones(2), ValueError, r"shape of t \(3,\), got y \(2,\)"),
    (jb.logistic_loss, jnp.ones((), jnp.int32), 1, TypeError, "t must be a floating"),
    (jb.logistic_loss, jnp.ones(()), jnp.ones((), jnp.complex64), TypeError, "y must be a label"),
    (jb.cross_entropy_loss, T3, jnp.array([1, 2]), ValueError,
     r"y must have shape t.shape\[:-1\] = \(\).*t \(3,\).*got y \(2,\)"),
    (jb.cross_entropy_loss, jnp.ones((2, 3)), 1, ValueError, r"= \(2,\).*got y \(\)"),
    (jb.cross_entropy_loss, T3, 1.0, TypeError, "y must be an integer class index"),
    (jb.cross_entropy_loss, T3, jnp.bool_(True), TypeError, "y must be an integer class index"),
    (jb.cross_entropy_loss, jnp.ones(3, jnp.int32), 1, TypeError, "t must be a floating"),
    (jb.cross_entropy_loss, jnp.ones(()), 0, ValueError, "t must have at least 1"),
    (jb.cross_entropy_loss, jnp.ones((2, 0)), jnp.zeros(2, jnp.int32), ValueError,
     "at least one class"),
])
def test_bad_input(fn, t, y, exc, match):
    with pytest.raises(exc, match=match):
        fn(t, y)
    with pytest.raises(exc, match=match):   # at trace time, under jit as well
        jax.jit(fn)(t, y)

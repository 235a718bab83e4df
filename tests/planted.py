"""The planted mistakes of ``test_check_catches_mistakes.py``: realistic bugs in hand-written
backwards, each written as its own small ``jax.custom_vjp`` the way the library's modules are
written (forward, ``_fwd`` saving residuals, ``_bwd``, ``defvjp``), with the line of the bug
marked ``BUG``, next to the inputs it is checked at."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jbackprop as jb
from jbackprop import reference as ref
from jbackprop.modules.wiring import apply

P = functools.partial


def n(seed, *shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64)


# ============================================================================================
# The mistakes. Each: a custom_vjp with one bug (marked BUG), its correct reference, its inputs.
# ============================================================================================

# --- (a) MM with W instead of Wᵀ in B[MM, z] (square W, so the shapes fit) -----------------
@jax.custom_vjp
def mm_no_transpose(params, z):
    return params["W"] @ z + params["b"]


def _mm_no_transpose_fwd(params, z):
    return mm_no_transpose(params, z), (params["W"], z)


def _mm_no_transpose_bwd(res, v):
    W, z = res
    return {"W": jnp.outer(v, z), "b": v}, W @ v          # BUG: W v, should be Wᵀ v


mm_no_transpose.defvjp(_mm_no_transpose_fwd, _mm_no_transpose_bwd)
MM_ARGS = ({"W": n(1, 4, 4), "b": n(2, 4)}, n(3, 4))


# --- (b) layer norm (LN-S) without the mean(g ⊙ x̂) term ------------------------------------
def _standardise(z, eps=1e-5):
    d = z - jnp.mean(z)
    r = jax.lax.rsqrt(jnp.mean(d * d) + eps)              # 1/σ̂
    return d * r, r


@jax.custom_vjp
def layer_norm_s_no_xhat_term(z):
    return _standardise(z)[0]


def _ln_fwd(z):
    xhat, r = _standardise(z)
    return xhat, (xhat, r)


def _ln_bwd(res, v):
    xhat, r = res
    return (r * (v - jnp.mean(v)),)                       # BUG: − x̂ · mean(v ⊙ x̂) is missing


layer_norm_s_no_xhat_term.defvjp(_ln_fwd, _ln_bwd)
LN_ARGS = (n(4, 6),)


# --- (c) a sign error: tanh backward −(1 − t²) v ----------------------------------------------
@jax.custom_vjp
def tanh_wrong_sign(z):
    return jnp.tanh(z)


def _tanh_fwd(z):
    t = jnp.tanh(z)
    return t, t


def _tanh_wrong_sign_bwd(t, v):
    return (-(1 - t * t) * v,)                            # BUG: the sign


tanh_wrong_sign.defvjp(_tanh_fwd, _tanh_wrong_sign_bwd)
TANH_ARGS = (n(5, 5),)


# --- (d) Conv1D-S whose input gradient is padded off by one -----------------------------------
def _correlate(x, w, pad):
    """Same-size correlation ``Σ_j w_j x_{i − pad[0] + j}`` of ``x`` zero-padded by ``pad``."""
    m = x.shape[0]
    xp = jnp.pad(x, pad)
    return sum(w[j] * xp[j:j + m] for j in range(w.shape[0]))


@jax.custom_vjp
def conv1d_s_off_by_one(params, z):
    ell = params["w"].shape[0] // 2
    return _correlate(z, params["w"], (ell, ell)) + params["b"]


def _conv_fwd(params, z):
    return conv1d_s_off_by_one(params, z), (params["w"], z)


def _conv_bwd(res, v):
    w, z = res
    k, m = w.shape[0], z.shape[0]
    ell = k // 2
    zp = jnp.pad(z, (ell, ell))
    w_bar = jnp.stack([jnp.vdot(v, zp[j:j + m]) for j in range(k)])   # Σ_i v_i z_{i−ℓ+j}
    z_bar = _correlate(v, jnp.flip(w), (ell + 1, ell - 1))  # BUG: should be padded (ℓ, ℓ)
    return {"w": w_bar, "b": jnp.sum(v)}, z_bar


conv1d_s_off_by_one.defvjp(_conv_fwd, _conv_bwd)
CONV_ARGS = ({"w": n(6, 3), "b": n(7)}, n(8, 8))


# --- (e) a batch loss whose backward sums instead of averaging (missing 1/B) ------------------
def _per_example_ce(T, y):
    m = jnp.max(T, axis=-1, keepdims=True)
    lse = m[:, 0] + jnp.log(jnp.sum(jnp.exp(T - m), axis=-1))
    return lse - jnp.take_along_axis(T, y[:, None], axis=-1)[:, 0]


@jax.custom_vjp
def batch_ce_missing_mean(T, y):
    """mean over the batch of the cross-entropy of logits T (B, k) with labels y (B,)."""
    return jnp.mean(_per_example_ce(T, y))


def _batch_ce_fwd(T, y):
    return batch_ce_missing_mean(T, y), (jax.nn.softmax(T, axis=-1), y)


def _batch_ce_bwd(res, v):
    p, y = res
    onehot = jax.nn.one_hot(y, p.shape[-1], dtype=p.dtype)
    return (p - onehot) * v, None                         # BUG: should be (p − onehot) v / B


batch_ce_missing_mean.defvjp(_batch_ce_fwd, _batch_ce_bwd)


def batch_ce_reference(T, y):
    return jnp.mean(jax.vmap(ref.cross_entropy_loss)(T, y))


CE_ARGS = (n(9, 4, 3), jnp.array([0, 2, 1, 2]))


# --- (f) ReLU with the mask z ≥ 0 (σ'(0) = 1), at an input with an exact 0 --------------------
@jax.custom_vjp
def relu_mask_ge(z):
    return jnp.maximum(z, 0)


def _relu_ge_fwd(z):
    return relu_mask_ge(z), z


def _relu_ge_bwd(z, v):
    return (jnp.where(z >= 0, v, 0.0),)                   # BUG: z > 0 (σ'(0) = 0, as jax.nn.relu)


relu_mask_ge.defvjp(_relu_ge_fwd, _relu_ge_bwd)


def kink_at(i):
    """An input of ReLU with an exact 0 (a kink) at index ``i``."""
    return (jnp.array([0.7, -1.3, 0.5, 2.1, -0.4]).at[i].set(0.0),)


# --- (g) softplus(β) whose backward forgets β: sigmoid(z) instead of sigmoid(βz) ----------------
BETA = 3.0


@P(jax.custom_vjp, nondiff_argnums=(1,))
def _softplus_forgets_beta(z, beta):
    return jnp.logaddexp(0, beta * z) / beta


def _softplus_fwd(z, beta):
    return _softplus_forgets_beta(z, beta), z


def _softplus_forgets_beta_bwd(beta, z, v):
    return (jax.nn.sigmoid(z) * v,)                       # BUG: sigmoid(β z)


_softplus_forgets_beta.defvjp(_softplus_fwd, _softplus_forgets_beta_bwd)


def softplus_forgets_beta(z):
    return _softplus_forgets_beta(z, BETA)


SOFTPLUS_ARGS = (n(10, 5),)


# --- (h) a residual block whose backward drops the skip gradient ------------------------------
@jax.custom_vjp
def residual_no_skip(params, z):
    inner = lambda p, x: jnp.tanh(p["W"] @ x + p["b"])
    return z + inner(params["mm2"], inner(params["mm1"], z))


def _residual_fwd(params, z):
    a1, mm1_back = jb.mm.vjp(params["mm1"], z)            # each pullback holds its residuals
    h1, sigma1_back = jb.tanh.vjp(a1)
    a2, mm2_back = jb.mm.vjp(params["mm2"], h1)
    h2, sigma2_back = jb.tanh.vjp(a2)
    return z + h2, (mm1_back, sigma1_back, mm2_back, sigma2_back)


def _residual_no_skip_bwd(res, v):
    mm1_back, sigma1_back, mm2_back, sigma2_back = res
    (a2_bar,) = sigma2_back(v)
    mm2_bar, h1_bar = mm2_back(a2_bar)
    (a1_bar,) = sigma1_back(h1_bar)
    mm1_bar, z_bar = mm1_back(a1_bar)
    return {"mm1": mm1_bar, "mm2": mm2_bar}, z_bar        # BUG: should be v + z_bar


residual_no_skip.defvjp(_residual_fwd, _residual_no_skip_bwd)
RES_ARGS = ({"mm1": {"W": n(11, 4, 4) / 2, "b": n(12, 4)},
             "mm2": {"W": n(13, 4, 4) / 2, "b": n(14, 4)}}, n(15, 4))


# --- (i) jit: Python control flow on array values in the backward -----------------------------
@jax.custom_vjp
def tanh_python_if(z):
    return jnp.tanh(z)


def _tanh_python_if_bwd(t, v):
    if float(jnp.max(jnp.abs(t))) < 1.0:                  # BUG: a Python `if` on an array value
        return ((1 - t * t) * v,)                         # "fast path": nothing saturated
    return (jnp.where(jnp.abs(t) < 1.0, (1 - t * t) * v, 0.0),)


tanh_python_if.defvjp(_tanh_fwd, _tanh_python_if_bwd)


# --- (j) vmap: a batching-dispatch module whose core backward ignores the batch axes ----------
@functools.partial(jb.custom_rules, batch_argnums=(1,))  # vmap: one call on the whole batch
def _mm_per_example(params, z):
    return z @ params["W"].T + params["b"]                # batched: U = X Wᵀ + b


def _mm_per_example_fwd(params, z):
    return _mm_per_example(params, z), (params["W"], z)


def _mm_per_example_bwd(res, v):
    W, z = res
    batch = tuple(range(z.ndim - 1))
    # BUG: jnp.outer flattens a batched z; should be jnp.tensordot(v, z, axes=(batch, batch))
    return {"W": jnp.outer(v, z), "b": v.sum(axis=batch)}, v @ W


def _mm_per_example_jvp(res, params_dot, z_dot):
    W, z = res
    return z_dot @ W.T + z @ params_dot["W"].T + params_dot["b"]   # right: W ż + Ẇ z + ḃ


_mm_per_example.defrules(_mm_per_example_fwd, _mm_per_example_bwd, _mm_per_example_jvp)


def mm_per_example(params, z):
    """MM whose core is called once on the whole batch under jax.vmap (as jb.mm)."""
    return apply(_mm_per_example, params, z)


# --- (k) reverse-over-reverse: right first derivative, wrong derivative of the backward -------
@jax.custom_vjp
def sigmoid_stop_gradient(z):
    return jax.nn.sigmoid(z)


def _sigmoid_fwd(z):
    s = jax.nn.sigmoid(z)
    return s, s


def _sigmoid_stop_gradient_bwd(s, v):
    s = jax.lax.stop_gradient(s)                          # BUG: "the residual is a constant"
    return (s * (1 - s) * v,)


sigmoid_stop_gradient.defvjp(_sigmoid_fwd, _sigmoid_stop_gradient_bwd)
SIGMOID_ARGS = (n(16, 5),)


# --- (l) linearity in v: "gradient clipping" inside the backward ------------------------------
def _mm_clipping(bound):
    @jax.custom_vjp
    def mm_clipping(params, z):
        return params["W"] @ z + params["b"]

    def fwd(params, z):
        return mm_clipping(params, z), (params["W"], z)

    def bwd(res, v):
        W, z = res
        v = jnp.clip(v, -bound, bound)                    # BUG: a backward must be linear in v
        return {"W": jnp.outer(v, z), "b": v}, W.T @ v

    mm_clipping.defvjp(fwd, bwd)
    mm_clipping.__name__ = f"mm_clipping_{bound:g}"
    return mm_clipping


mm_clip_1, mm_clip_3, mm_clip_10 = _mm_clipping(1.0), _mm_clipping(3.0), _mm_clipping(10.0)
CLIP_ARGS = ({"W": n(17, 3, 4), "b": n(18, 3)}, n(19, 4))


# --- (m) contract: right values in the wrong dtype ---------------------------------------------
@jax.custom_vjp
def tanh_float64_cotangent(z):
    return jnp.tanh(z)


def _tanh_float64_bwd(t, v):
    return (((1 - t * t) * v).astype(jnp.float64),)       # BUG: float64 for a float32 z


tanh_float64_cotangent.defvjp(_tanh_fwd, _tanh_float64_bwd)
TANH32_ARGS = (n(21, 5).astype(jnp.float32),)


# --- (n) determinism: Python randomness in the backward -----------------------------------------
@jax.custom_vjp
def tanh_noisy(z):
    return jnp.tanh(z)


def _tanh_noisy_bwd(t, v):
    wobble = 1 + 1e-12 * np.random.default_rng().standard_normal()   # BUG: a new draw per call
    return ((1 - t * t) * v * wobble,)


tanh_noisy.defvjp(_tanh_fwd, _tanh_noisy_bwd)


# --- (o) per element: a sign error only where z < 0, hidden by large elements ----------------
@jax.custom_vjp
def cube_abs(z):
    return z ** 3 / 3


def _cube_fwd(z):
    return cube_abs(z), z


def _cube_abs_bwd(z, v):
    return (z * jnp.abs(z) * v,)                          # BUG: z|z| for z², wrong for z < 0


cube_abs.defvjp(_cube_fwd, _cube_abs_bwd)
CUBE_ARGS = (jnp.array([1e4, -1.0, 3e3]),)


def cube_reference(z):
    return z ** 3 / 3


# --- (p) integer leaves: a notes-form backward that "differentiates" an integer step -------
def scaled_mm(params, z):
    """``step · W z`` with an integer ``step`` (not differentiated)."""
    return params["step"] * (params["W"] @ z)


def scaled_mm_backward(params, z, v):
    W, step = params["W"], params["step"]
    # BUG: an integer leaf gets a float cotangent; it must be None (or float0 zeros)
    return {"W": step * jnp.outer(v, z), "step": jnp.vdot(v, W @ z)}, step * (W.T @ v)


SCALED_MM_ARGS = ({"W": n(30, 3, 4), "step": jnp.asarray(3)}, n(31, 4))


# --- (q) primal: the forward rule returns another function's output --------------------------
@jax.custom_vjp
def layer_norm_s_fwd_eps(z):
    return _standardise(z)[0]


def _ln_fwd_eps(z):
    return _standardise(z, eps=1e-3)[0], z                # BUG: the forward rule's eps is 1e-3


def _ln_bwd_recompute(z, v):
    xhat, r = _standardise(z)                             # (the backward recomputes, rightly)
    return (r * (v - jnp.mean(v) - xhat * jnp.mean(v * xhat)),)


layer_norm_s_fwd_eps.defvjp(_ln_fwd_eps, _ln_bwd_recompute)


# --- (r) zeros: a "stabilising" rescale of v that divides 0 by 0 ------------------------------
@jax.custom_vjp
def tanh_rescaled(z):
    return jnp.tanh(z)


def _tanh_rescaled_bwd(t, v):
    s = jnp.max(jnp.abs(v))                               # BUG: 0/0 = NaN when v = 0
    return ((1 - t * t) * (v / s) * s,)


tanh_rescaled.defvjp(_tanh_fwd, _tanh_rescaled_bwd)


# --- (s) precision: the one-pass variance E[z²] − E[z]² in the backward -----------------------
@jax.custom_vjp
def layer_norm_s_one_pass(z):
    return _standardise(z)[0]


def _ln_one_pass_bwd(z, v):
    mu = jnp.mean(z)
    r = jax.lax.rsqrt(jnp.mean(z * z) - mu * mu + 1e-5)  # BUG: cancels at |mean| ≫ σ in float32
    xhat = (z - mu) * r
    return (r * (v - jnp.mean(v) - xhat * jnp.mean(v * xhat)),)


layer_norm_s_one_pass.defvjp(lambda z: (layer_norm_s_one_pass(z), z), _ln_one_pass_bwd)
OFFSET_LN_ARGS = ((1e3 + n(32, 8)).astype(jnp.float32),)


# --- (t) non-finite: sigmoid' as e^{−z} / (1 + e^{−z})², which overflows --------------------
@jax.custom_vjp
def sigmoid_naive(z):
    return jax.nn.sigmoid(z)


def _sigmoid_naive_bwd(z, v):
    e = jnp.exp(-z)                                       # BUG: inf for z < −709: inf/inf
    return (e / (1 + e) ** 2 * v,)


sigmoid_naive.defvjp(lambda z: (sigmoid_naive(z), z), _sigmoid_naive_bwd)


# --- (j') vmap: mistake (j) with the data first, fn(z, params) -------------------------------
def mm_per_example_data_first(z, params):
    return mm_per_example(params, z)

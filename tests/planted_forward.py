"""Planted mistakes in hand-written JVPs (``test_check_forward.py``): each a ``jb.custom_rules``
function whose backward is right and whose JVP has one bug (marked ``BUG``), the way the
library's modules are written, next to the inputs it is checked at."""
from __future__ import annotations

import jax
import jax.numpy as jnp

import jbackprop as jb
from planted import _standardise     # x̂ and 1/σ̂ of one row, as in (b)


def n(seed, *shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64)


def _mm(params, z):
    return params["W"] @ z + params["b"]


def _mm_fwd(params, z):
    return _mm(params, z), (params["W"], z)               # residuals: W and z


def _mm_bwd(res, v):
    W, z = res
    return {"W": jnp.outer(v, z), "b": v}, W.T @ v         # right: v zᵀ, v, Wᵀ v


# --- (A) MM's JVP with the weight transposed: Wᵀ ż (square W, so the shapes fit) -----------
mm_jvp_transposed = jb.custom_rules(_mm)
mm_jvp_transposed.defrules(_mm_fwd, _mm_bwd, lambda res, p_dot, z_dot: (
    res[0].T @ z_dot + p_dot["W"] @ res[1] + p_dot["b"]))  # BUG: Wᵀ ż, should be W ż

# --- (B) MM's JVP without the Ẇ z term (the weight's tangent is dropped) -------------------
mm_jvp_no_weight_term = jb.custom_rules(_mm)
mm_jvp_no_weight_term.defrules(_mm_fwd, _mm_bwd, lambda res, p_dot, z_dot: (
    res[0] @ z_dot + p_dot["b"]))                           # BUG: + Ẇ z missing
MM_ARGS = ({"W": n(1, 4, 4), "b": n(2, 4)}, n(3, 4))


# --- (C) ReLU's JVP with the kink on the wrong side: 1{z ≥ 0} (backward: 1{z > 0}) ----------
@jb.custom_rules
def relu_jvp_kink(z):
    return jnp.maximum(z, 0)


relu_jvp_kink.defrules(lambda z: (relu_jvp_kink(z), z),
                       lambda z, v: (jnp.where(z > 0, v, 0.0),),
                       lambda z, z_dot: jnp.where(z >= 0, z_dot, 0.0))   # BUG: ≥, as jax: >
RELU_ARGS = (jnp.array([-1.5, 0.0, 0.7, 0.0, 2.0, -0.3]),)


# --- (D) LN-S's JVP without the x̂ mean(ż ⊙ x̂) term ------------------------------------------
@jb.custom_rules
def layer_norm_s_jvp_no_xhat_term(z):
    return _standardise(z)[0]


def _ln_bwd(res, v):
    xhat, r = res
    return (r * (v - jnp.mean(v) - xhat * jnp.mean(v * xhat)),)


layer_norm_s_jvp_no_xhat_term.defrules(
    lambda z: (layer_norm_s_jvp_no_xhat_term(z), _standardise(z)), _ln_bwd,
    lambda res, z_dot: res[1] * (z_dot - jnp.mean(z_dot)))   # BUG: − x̂ mean(ż ⊙ x̂) missing
LN_ARGS = (n(4, 6) + 0.5,)


# --- (E) tanh's JVP of |ż| (not linear in the tangent) ----------------------------------------
@jb.custom_rules
def tanh_jvp_abs(z):
    return jnp.tanh(z)


tanh_jvp_abs.defrules(lambda z: (jnp.tanh(z), jnp.tanh(z)),
                      lambda t, v: ((1 - t * t) * v,),
                      lambda t, z_dot: (1 - t * t) * jnp.abs(z_dot))   # BUG: |ż|, should be ż
TANH_ARGS = (n(5, 3, 4),)


# --- a right one: z³/3 with both rules, needing no reference -------------------------------
@jb.custom_rules
def cube(z):
    return z ** 3 / 3


cube.defrules(lambda z: (cube(z), z), lambda z, v: (z * z * v,), lambda z, z_dot: z * z * z_dot)
CUBE_ARGS = (n(6, 5),)

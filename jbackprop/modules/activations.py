"""Element-wise activations (notes 7.24–7.28 and the lecture slides).

Every activation has ``B[σ, z](v) = σ'(z) ⊙ v`` (7.69) and the JVP ``σ'(z) ⊙ ż``: the
Jacobian is diagonal (and so its own transpose), both rules are a Hadamard product and no
Jacobian is formed. Each accepts any shape. ReLU saves
the mask ``z > 0`` (one byte per element); where ``σ'`` can be written in terms of the output,
the residual is the output (which a following MM keeps anyway); otherwise it is the input ``z``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jbackprop import reference
from jbackprop.modules import arguments
from jbackprop.modules.registry import away_from, declare
from jbackprop.modules.rules import custom_rules
from jbackprop.modules.wiring import apply

# The public modules, re-exported by jbackprop.
__all__ = ["relu", "sigmoid", "tanh", "leaky_relu", "gelu", "softplus", "elu"]


def _z(z):
    return arguments.float_array(z, "z")


def _examples(rng):
    """Two shapes (any shape is accepted), away from the kinks at 0."""
    return [(away_from(rng, (7, 5)),), (away_from(rng, (3, 4, 16)),)]


def _declare(fn, core, layer, backward, kinks="", hyper=({},)):
    declare(fn, core=core, reference=getattr(reference, fn.__name__), examples=_examples,
            family="activations", section=fn.__name__.replace("_", "-"), shapes="any shape",
            backward=backward, tangent="`σ'(z) ⊙ ż`", kinks=kinks, hyper=hyper, layer=layer)


# --- ReLU: σ(z) = max(z, 0), σ'(z) = 1{z > 0} (0 at z = 0, as jax.nn.relu) ---------------
@functools.partial(custom_rules, batch_argnums=(0,))
def _relu(z):
    return jnp.maximum(z, 0)


def _relu_fwd(z):
    return _relu(z), z > 0                            # residual: the mask 1{z > 0} (bool)


def _relu_bwd(mask, v):
    return (jnp.where(mask, v, jnp.zeros_like(v)),)   # 1{z > 0} ⊙ v


def _relu_jvp(mask, z_dot):
    return jnp.where(mask, z_dot, jnp.zeros_like(z_dot))   # 1{z > 0} ⊙ ż


_relu.defrules(_relu_fwd, _relu_bwd, _relu_jvp)


def relu(z):
    """ReLU ``max(z, 0)``; backward ``1{z > 0} ⊙ v``. Residual: the mask ``z > 0`` (bool, one
    byte per element). Any shape."""
    return apply(_relu, _z(z))


_declare(relu, _relu, "Relu", "`1{z > 0} ⊙ v`", kinks="z = 0: σ' = 0 (as `jax.nn.relu`)")


# --- sigmoid: σ(z) = 1/(1 + e^{-z}), σ' = σ(1 − σ) --------------------------------------
@functools.partial(custom_rules, batch_argnums=(0,))
def _sigmoid(z):
    return jax.lax.logistic(z)                        # stable for large |z|


def _sigmoid_fwd(z):
    s = _sigmoid(z)
    return s, s                                       # residual: s = σ(z)


def _sigmoid_bwd(s, v):
    return (s * (1 - s) * v,)


def _sigmoid_jvp(s, z_dot):
    return s * (1 - s) * z_dot


_sigmoid.defrules(_sigmoid_fwd, _sigmoid_bwd, _sigmoid_jvp)


def sigmoid(z):
    """Sigmoid ``1/(1 + e^{-z})``; backward ``σ(z)(1 − σ(z)) ⊙ v``. Residual: the output."""
    return apply(_sigmoid, _z(z))


_declare(sigmoid, _sigmoid, "Sigmoid", "`σ(z)(1 − σ(z)) ⊙ v`")


# --- tanh: σ' = 1 − tanh² ---------------------------------------------------------------
@functools.partial(custom_rules, batch_argnums=(0,))
def _tanh(z):
    return jnp.tanh(z)


def _tanh_fwd(z):
    t = _tanh(z)
    return t, t                                       # residual: t = tanh(z)


def _tanh_bwd(t, v):
    return ((1 - t * t) * v,)


def _tanh_jvp(t, z_dot):
    return (1 - t * t) * z_dot


_tanh.defrules(_tanh_fwd, _tanh_bwd, _tanh_jvp)


def tanh(z):
    """tanh; backward ``(1 − tanh²(z)) ⊙ v``. Residual: the output. Any shape."""
    return apply(_tanh, _z(z))


_declare(tanh, _tanh, "Tanh", "`(1 − tanh²(z)) ⊙ v`")


# --- leaky ReLU: max(z, γz), σ' = 1 if z > 0 else γ --------------------------------------
@functools.partial(custom_rules, nondiff_argnames=("gamma",), batch_argnums=(0,))
def _leaky_relu(z, gamma):
    return jnp.where(z > 0, z, gamma * z)


def _leaky_relu_fwd(z, gamma):
    u = _leaky_relu(z, gamma)
    return u, u                                       # residual: u (u > 0 ⟺ z > 0, γ > 0)


def _leaky_relu_bwd(gamma, u, v):
    return (jnp.where(u > 0, v, gamma * v),)


def _leaky_relu_jvp(gamma, u, z_dot):
    return jnp.where(u > 0, z_dot, gamma * z_dot)


_leaky_relu.defrules(_leaky_relu_fwd, _leaky_relu_bwd, _leaky_relu_jvp)


def leaky_relu(z, gamma=0.01):
    """Leaky ReLU ``max(z, γz)``, ``γ ∈ (0, 1]`` static; backward ``(1 if z > 0 else γ) ⊙ v``.

    Residual: the output. The slides use γ = 0.1; the default 0.01 is jax.nn's.
    """
    gamma = arguments.static_number(gamma, "gamma", low=0, high=1, low_open=True)
    return apply(_leaky_relu, _z(z), gamma=gamma)


_declare(leaky_relu, _leaky_relu, "LeakyRelu", "`(1 if z > 0 else γ) ⊙ v`",
         kinks="z = 0: σ' = γ", hyper=({"gamma": 0.1},))


# --- GELU: z Φ(z), σ' = Φ(z) + z φ(z); tanh form: z/2 (1 + tanh(c (z + a z³))) ----------
_GELU_C, _GELU_A = math.sqrt(2 / math.pi), 0.044715


def _cdf(z):
    """Φ(z) = ½ erfc(−z/√2): to full relative precision also for z ≪ 0, where 1 + erf cancels."""
    return 0.5 * jax.lax.erfc(-z / math.sqrt(2))


@functools.partial(custom_rules, nondiff_argnames=("approximate",), batch_argnums=(0,))
def _gelu(z, approximate):
    if approximate:
        return 0.5 * z * (1 + jnp.tanh(_GELU_C * (z + _GELU_A * z ** 3)))
    return z * _cdf(z)


def _gelu_fwd(z, approximate):
    return _gelu(z, approximate), z                   # residual: z


def _gelu_slope(z, approximate):
    """σ'(z): Φ(z) + z φ(z); tanh form, with t = tanh(c(z + a z³)),
    d/dz [z/2 (1 + t)] = (1 + t)/2 + z/2 (1 − t²) c (1 + 3a z²)."""
    if approximate:
        t = jnp.tanh(_GELU_C * (z + _GELU_A * z ** 3))
        # where tanh saturates, 1 − t² is 0 and z³ may overflow: keep 0 · ∞ out of it
        slope = 0.5 * z * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * z * z)
        return 0.5 * (1 + t) + jnp.where(t * t < 1, slope, 0)
    return _cdf(z) + z * jnp.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _gelu_bwd(approximate, z, v):
    return (_gelu_slope(z, approximate) * v,)


def _gelu_jvp(approximate, z, z_dot):
    return _gelu_slope(z, approximate) * z_dot


_gelu.defrules(_gelu_fwd, _gelu_bwd, _gelu_jvp)


def gelu(z, approximate=False):
    """GELU ``z Φ(z)``; ``approximate=True`` is the tanh form of BERT/GPT. Residual: ``z``.

    Backward: ``(Φ(z) + z φ(z)) ⊙ v``; tanh form ``(½(1 + t) + ½ z (1 − t²) c (1 + 3a z²)) ⊙ v``
    with ``t = tanh(c (z + a z³))``, ``c = √(2/π)``, ``a = 0.044715``.
    """
    if not isinstance(approximate, bool):
        raise TypeError(f"approximate must be a bool, got {type(approximate).__name__}")
    return apply(_gelu, _z(z), approximate=approximate)


_declare(gelu, _gelu, "Gelu", "`(Φ(z) + z φ(z)) ⊙ v` (tanh form: its derivative)",
         hyper=({}, {"approximate": True}))


# --- softplus: (1/β) log(1 + e^{βz}), σ' = sigmoid(βz) ------------------------------------
@functools.partial(custom_rules, nondiff_argnames=("beta",), batch_argnums=(0,))
def _softplus(z, beta):
    return jnp.logaddexp(0, beta * z) / beta          # no overflow for large |βz|


def _softplus_fwd(z, beta):
    return _softplus(z, beta), z                      # residual: z


def _softplus_bwd(beta, z, v):
    return (jax.lax.logistic(beta * z) * v,)


def _softplus_jvp(beta, z, z_dot):
    return jax.lax.logistic(beta * z) * z_dot


_softplus.defrules(_softplus_fwd, _softplus_bwd, _softplus_jvp)


def softplus(z, beta=1.0):
    """Softplus ``(1/β) log(1 + e^{βz})``, ``β > 0`` static; backward ``sigmoid(βz) ⊙ v``.

    Residual: ``z``. Stable for any ``|βz|``.
    """
    beta = arguments.static_number(beta, "beta", low=0, low_open=True)
    return apply(_softplus, _z(z), beta=beta)


_declare(softplus, _softplus, "Softplus", "`sigmoid(βz) ⊙ v`", hyper=({"beta": 2.0},))


# --- ELU: z if z ≥ 0 else α(e^z − 1), σ' = 1 if z ≥ 0 else α e^z ---------------------------
@functools.partial(custom_rules, nondiff_argnames=("alpha",), batch_argnums=(0,))
def _elu(z, alpha):
    return jnp.where(z >= 0, z, alpha * jnp.expm1(jnp.minimum(z, 0)))


def _elu_fwd(z, alpha):
    return _elu(z, alpha), z                          # residual: z


def _elu_bwd(alpha, z, v):
    return (jnp.where(z >= 0, v, alpha * jnp.exp(jnp.minimum(z, 0)) * v),)


def _elu_jvp(alpha, z, z_dot):
    return jnp.where(z >= 0, z_dot, alpha * jnp.exp(jnp.minimum(z, 0)) * z_dot)


_elu.defrules(_elu_fwd, _elu_bwd, _elu_jvp)


def elu(z, alpha=1.0):
    """ELU ``z`` if ``z ≥ 0`` else ``α(e^z − 1)``, ``α ≥ 0`` static; backward
    ``(1 if z ≥ 0 else α e^z) ⊙ v``. Residual: ``z``."""
    return apply(_elu, _z(z), alpha=arguments.static_number(alpha, "alpha", low=0))


_declare(elu, _elu, "Elu", "`(1 if z ≥ 0 else α e^z) ⊙ v`",
         kinks="z = 0 when α ≠ 1: σ' = 1", hyper=({"alpha": 0.7},))


# --- the derivative from the output, for composite modules ------------------------------------
def derivative_from_output(activation) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
    """``(u, x) -> σ'(z) ⊙ x`` written with the output ``u = σ(z)``, or ``None``.

    The Jacobian is diagonal, so this one map is both the backward (``x = v``) and the JVP
    (``x = ż``). For ReLU (``1{u > 0}``), leaky ReLU (``γ > 0``), sigmoid (``u(1 − u)``) and
    tanh (``1 − u²``) the derivative is a function of the output. A composite module whose next
    step keeps ``u`` anyway (the residual block: MM2 saves its input ``h1 = σ(a1)``) then needs
    no residual for σ at all. ``activation`` is the module or a ``functools.partial`` of it.
    """
    fn, kw = (activation.func, activation.keywords) if isinstance(activation, functools.partial) \
        else (activation, {})
    if fn is relu:
        return functools.partial(_leaky_relu_jvp, 0.0)
    if fn is leaky_relu:
        return functools.partial(_leaky_relu_jvp, kw.get("gamma", 0.01))
    if fn is sigmoid:
        return _sigmoid_jvp
    if fn is tanh:
        return _tanh_jvp
    return None

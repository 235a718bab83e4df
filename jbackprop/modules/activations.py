"""Element-wise activations (notes 7.24–7.28 and the lecture slides).

Every activation has ``B[σ, z](v) = σ'(z) ⊙ v`` (7.69): the Jacobian is diagonal, so the
backward is a Hadamard product and no Jacobian is formed. Each accepts any shape. ReLU saves
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
            backward=backward, kinks=kinks, hyper=hyper, layer=layer)


# --- ReLU: σ(z) = max(z, 0), σ'(z) = 1{z > 0} (0 at z = 0, as jax.nn.relu) ---------------
@jax.custom_vjp
def _relu(z):
    return jnp.maximum(z, 0)


def _relu_fwd(z):
    return _relu(z), z > 0                            # residual: the mask 1{z > 0} (bool)


def _relu_bwd(mask, v):
    return (jnp.where(mask, v, jnp.zeros_like(v)),)   # 1{z > 0} ⊙ v


_relu.defvjp(_relu_fwd, _relu_bwd)


def relu(z):
    """ReLU ``max(z, 0)``; backward ``1{z > 0} ⊙ v``. Residual: the mask ``z > 0`` (bool, one
    byte per element). Any shape."""
    return apply(_relu, _z(z))


_declare(relu, _relu, "Relu", "`1{z > 0} ⊙ v`", kinks="z = 0: σ' = 0 (as `jax.nn.relu`)")


# --- sigmoid: σ(z) = 1/(1 + e^{-z}), σ' = σ(1 − σ) --------------------------------------
@jax.custom_vjp
def _sigmoid(z):
    return jax.lax.logistic(z)                        # stable for large |z|


def _sigmoid_fwd(z):
    s = _sigmoid(z)
    return s, s                                       # residual: s = σ(z)


def _sigmoid_bwd(s, v):
    return (s * (1 - s) * v,)


_sigmoid.defvjp(_sigmoid_fwd, _sigmoid_bwd)


def sigmoid(z):
    """Sigmoid ``1/(1 + e^{-z})``; backward ``σ(z)(1 − σ(z)) ⊙ v``. Residual: the output."""
    return apply(_sigmoid, _z(z))


_declare(sigmoid, _sigmoid, "Sigmoid", "`σ(z)(1 − σ(z)) ⊙ v`")


# --- tanh: σ' = 1 − tanh² ---------------------------------------------------------------
@jax.custom_vjp
def _tanh(z):
    return jnp.tanh(z)


def _tanh_fwd(z):
    t = _tanh(z)
    return t, t                                       # residual: t = tanh(z)


def _tanh_bwd(t, v):
    return ((1 - t * t) * v,)


_tanh.defvjp(_tanh_fwd, _tanh_bwd)


def tanh(z):
    """tanh; backward ``(1 − tanh²(z)) ⊙ v``. Residual: the output. Any shape."""
    return apply(_tanh, _z(z))


_declare(tanh, _tanh, "Tanh", "`(1 − tanh²(z)) ⊙ v`")


# --- leaky ReLU: max(z, γz), σ' = 1 if z > 0 else γ --------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnames=("gamma",))
def _leaky_relu(z, gamma):
    return jnp.where(z > 0, z, gamma * z)


def _leaky_relu_fwd(z, gamma):
    u = _leaky_relu(z, gamma)
    return u, u                                       # residual: u (u > 0 ⟺ z > 0, γ > 0)


def _leaky_relu_bwd(gamma, u, v):
    return (jnp.where(u > 0, v, gamma * v),)


_leaky_relu.defvjp(_leaky_relu_fwd, _leaky_relu_bwd)


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


@functools.partial(jax.custom_vjp, nondiff_argnames=("approximate",))
def _gelu(z, approximate):
    if approximate:
        return 0.5 * z * (1 + jnp.tanh(_GELU_C * (z + _GELU_A * z ** 3)))
    return z * _cdf(z)


def _gelu_fwd(z, approximate):
    return _gelu(z, approximate), z                   # residual: z


def _gelu_bwd(approximate, z, v):
    if approximate:  # d/dz [z/2 (1 + t)], t = tanh(c(z + a z³)): (1 + t)/2 + z/2 (1 − t²) c (1 + 3a z²)
        t = jnp.tanh(_GELU_C * (z + _GELU_A * z ** 3))
        # where tanh saturates, 1 − t² is 0 and z³ may overflow: keep 0 · ∞ out of it
        slope = 0.5 * z * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * z * z)
        d = 0.5 * (1 + t) + jnp.where(t * t < 1, slope, 0)
    else:            # Φ(z) + z φ(z)
        d = _cdf(z) + z * jnp.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return (d * v,)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)


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
@functools.partial(jax.custom_vjp, nondiff_argnames=("beta",))
def _softplus(z, beta):
    return jnp.logaddexp(0, beta * z) / beta          # no overflow for large |βz|


def _softplus_fwd(z, beta):
    return _softplus(z, beta), z                      # residual: z


def _softplus_bwd(beta, z, v):
    return (jax.lax.logistic(beta * z) * v,)


_softplus.defvjp(_softplus_fwd, _softplus_bwd)


def softplus(z, beta=1.0):
    """Softplus ``(1/β) log(1 + e^{βz})``, ``β > 0`` static; backward ``sigmoid(βz) ⊙ v``.

    Residual: ``z``. Stable for any ``|βz|``.
    """
    beta = arguments.static_number(beta, "beta", low=0, low_open=True)
    return apply(_softplus, _z(z), beta=beta)


_declare(softplus, _softplus, "Softplus", "`sigmoid(βz) ⊙ v`", hyper=({"beta": 2.0},))


# --- ELU: z if z ≥ 0 else α(e^z − 1), σ' = 1 if z ≥ 0 else α e^z ---------------------------
@functools.partial(jax.custom_vjp, nondiff_argnames=("alpha",))
def _elu(z, alpha):
    return jnp.where(z >= 0, z, alpha * jnp.expm1(jnp.minimum(z, 0)))


def _elu_fwd(z, alpha):
    return _elu(z, alpha), z                          # residual: z


def _elu_bwd(alpha, z, v):
    return (jnp.where(z >= 0, v, alpha * jnp.exp(jnp.minimum(z, 0)) * v),)


_elu.defvjp(_elu_fwd, _elu_bwd)


def elu(z, alpha=1.0):
    """ELU ``z`` if ``z ≥ 0`` else ``α(e^z − 1)``, ``α ≥ 0`` static; backward
    ``(1 if z ≥ 0 else α e^z) ⊙ v``. Residual: ``z``."""
    return apply(_elu, _z(z), alpha=arguments.static_number(alpha, "alpha", low=0))


_declare(elu, _elu, "Elu", "`(1 if z ≥ 0 else α e^z) ⊙ v`",
         kinks="z = 0 when α ≠ 1: σ' = 1", hyper=({"alpha": 0.7},))


# --- the backward from the output, for composite modules --------------------------------------
def backward_from_output(activation) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
    """``(u, v) -> B[σ, z](v)`` written with the output ``u = σ(z)``, or ``None``.

    For ReLU (``1{u > 0} v``), leaky ReLU (``γ > 0``), sigmoid (``u(1 − u) v``) and tanh
    (``(1 − u²) v``) the derivative is a function of the output. A composite module whose next
    step keeps ``u`` anyway (the residual block: MM2 saves its input ``h1 = σ(a1)``) then needs
    no residual for σ at all. ``activation`` is the module or a ``functools.partial`` of it.
    """
    fn, kw = (activation.func, activation.keywords) if isinstance(activation, functools.partial) \
        else (activation, {})
    if fn is relu:
        return lambda u, v: _leaky_relu_bwd(0.0, u, v)[0]
    if fn is leaky_relu:
        return lambda u, v: _leaky_relu_bwd(kw.get("gamma", 0.01), u, v)[0]
    if fn is sigmoid:
        return lambda u, v: _sigmoid_bwd(u, v)[0]
    if fn is tanh:
        return lambda u, v: _tanh_bwd(u, v)[0]
    return None

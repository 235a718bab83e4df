"""Dropout (and, in docs/regularisation.md, its derivation).

* ``dropout``: inverted dropout, ``u = m ⊙ z/(1 − r)`` with a Bernoulli mask ``m`` (keep
  probability ``1 − r``) drawn from ``key``. The map is linear in ``z`` with the diagonal
  Jacobian ``diag(m)/(1 − r)``, so ``B[dropout, z](v) = m ⊙ v/(1 − r)`` and the JVP is
  ``m ⊙ ż/(1 − r)``. **The rules regenerate ``m`` from the key**: the only residual is the key
  (two 32-bit words), not a mask of ``z``'s size. The key gets no gradient.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop import reference
from jbackprop._compat import Tracer
from jbackprop.modules import arguments
from jbackprop.modules.registry import declare, normal
from jbackprop.modules.rules import custom_rules
from jbackprop.modules.wiring import apply

# The public modules, re-exported by jbackprop.
__all__ = ["dropout"]


def _kept(key, rate, shape):
    """The mask ``m``: each position kept with probability ``1 − rate``, from ``key`` alone."""
    return jax.random.bernoulli(key, 1 - rate, shape)


def _scaled(key, rate, x):
    """``m ⊙ x/(1 − r)``: the forward on ``z``, the backward on ``v``, the JVP on ``ż``."""
    return jnp.where(_kept(key, rate, x.shape), x / (1 - rate), jnp.zeros_like(x))


@functools.partial(custom_rules, nondiff_argnames=("rate",))
def _dropout(z, key, rate):
    return _scaled(key, rate, z)


def _dropout_fwd(z, key, rate):
    return _dropout(z, key, rate), key                # residual: the key only (no mask)


def _dropout_bwd(rate, key, v):
    return _scaled(key, rate, v), None                # B[dropout, z](v) = m ⊙ v/(1 − r); key: none


def _dropout_jvp(rate, key, z_dot, key_dot):
    return _scaled(key, rate, z_dot)                  # u̇ = m ⊙ ż/(1 − r)


_dropout.defrules(_dropout_fwd, _dropout_bwd, _dropout_jvp)


def _check_key(key):
    if isinstance(key, Tracer) or isinstance(key, jax.Array):
        dtype, shape = key.dtype, key.shape
    else:
        key = np.asarray(key)
        dtype, shape = key.dtype, key.shape
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(f"dropout: key must be a single key (shape ()), got shape {shape}; "
                             "split it per example and use jax.vmap")
        return key
    if dtype != np.uint32 or shape != (2,):
        raise TypeError(f"dropout: key must be a PRNG key (jax.random.key(0) or "
                        f"jax.random.PRNGKey(0)), got dtype {dtype} and shape {shape}")
    return jnp.asarray(key)


def dropout(z, key, rate):
    r"""Inverted dropout: ``u = m ⊙ z/(1 − rate)``, ``m_i ~ Bernoulli(1 − rate)`` from ``key``.

    .. math::
        B[\mathrm{dropout}, z](v) = m \odot v/(1 - r), \qquad \dot u = m \odot \dot z/(1 - r).

    Residual: the key; the backward and the JVP regenerate the mask from it (no mask is
    stored). The key gets no gradient (``None``). ``rate=0`` returns ``z`` itself. Training
    mode only: at evaluation, do not call it (the ``1/(1 − r)`` scaling makes that correct).
    A ``z`` with leading axes draws one mask for the whole array; under ``jax.vmap`` with one
    key every example gets the *same* mask: split the key and map over the keys as well.

    Args:
      z: any shape, floating.
      key: a PRNG key, new-style (``jax.random.key(0)``) or raw (``jax.random.PRNGKey(0)``).
      rate: static drop probability in ``[0, 1)``.

    Raises:
      TypeError: ``z`` not floating, ``key`` not a key. ValueError: ``rate`` outside
        ``[0, 1)``, a batch of keys.
    """
    z = arguments.float_array(z, "z")
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) \
            or not 0 <= rate < 1:
        raise ValueError(f"dropout: rate must be a number in [0, 1), got {rate!r}")
    key = _check_key(key)
    if rate == 0:
        return z
    return apply(_dropout, z, key, rate=float(rate))


declare(dropout, core=_dropout, num_arrays=2, reference=reference.dropout,
        examples=lambda rng: [(normal(rng, 7, 5), np.array([0, 7], np.uint32)),
                              (normal(rng, 3, 4, 16), np.array([1, 2], np.uint32))],
        hyper=({"rate": 0.5},), nondiff=(1,), batch_axes=False,
        family="regularisation", section="dropout", shapes="any shape; a PRNG key; `rate`",
        backward="`m ⊙ v/(1 − r)`, the mask regenerated from the key",
        tangent="`m ⊙ ż/(1 − r)`")

"""Matrix multiplication MM (notes 7.35, 7.62–7.66).

One example is a column vector ``z ∈ R^m`` and ``MM_{W,b}(z) = W z + b``. Extra leading axes of
``z`` are a batch (row-major ``U = X Wᵀ + b``, 7.84); under ``jax.vmap`` the module is called on
the batch once, so its weight gradient is one matrix multiply (see ``wiring``).
"""
from __future__ import annotations

import functools

import jax

from jbackprop import reference
from jbackprop.modules import arguments
from jbackprop.modules.registry import declare, normal
from jbackprop.modules.rules import custom_rules
from jbackprop.modules.wiring import apply, sum_over_batch

# The public modules, re-exported by jbackprop.
__all__ = ["mm"]


@functools.partial(custom_rules, batch_argnums=(1,))
def _mm(params, z):
    u = z @ params["W"].T
    return u + params["b"] if "b" in params else u


def _mm_fwd(params, z):
    keys = dict.fromkeys(params)                      # {"W": None, "b": None}: structure only
    return _mm(params, z), (params["W"], z, keys)     # residuals: W and z


def _mm_bwd(res, v):
    W, z, keys = res
    batch = tuple(range(z.ndim - 1))                 # leading (batch) axes, summed over
    W_bar = sum_over_batch(v, z, batch, like=W)        # B[MM, W](v) = v zᵀ   (Σ_batch: Vᵀ X)
    # W_bar first: then z (often kept only for this) is dead before z_bar's buffer is needed.
    # XLA may otherwise schedule z_bar first and hold both (+1 activation of temporary memory).
    W_bar, v = jax.lax.optimization_barrier((W_bar, v))
    z_bar = v @ W                                     # B[MM, z](v) = Wᵀ v   (batched: V W)
    params_bar = {"W": W_bar}
    if "b" in keys:
        params_bar["b"] = v.sum(axis=batch)           # B[MM, b](v) = v      (Σ_batch)
    return params_bar, z_bar


def _mm_jvp(res, params_dot, z_dot):
    W, z, keys = res
    u_dot = z_dot @ W.T + z @ params_dot["W"].T       # J_MM(z) ż + J_MM(W) Ẇ = W ż + Ẇ z
    return u_dot + params_dot["b"] if "b" in keys else u_dot   # + ḃ


_mm.defrules(_mm_fwd, _mm_bwd, _mm_jvp)


def mm(params, z):
    r"""Matrix multiplication ``MM_{W,b}(z) = W z + b`` with a hand-written backward and JVP.

    .. math::
        B[MM, z](v) = W^\top v, \quad B[MM, W](v) = v z^\top, \quad B[MM, b](v) = v;
        \qquad \dot u = W \dot z + \dot W z + \dot b.

    Residuals saved by the forward (for both rules): ``W`` and ``z`` (nothing new is allocated). The backward
    computes ``B[MM, W]`` before ``B[MM, z]`` (an ``optimization_barrier`` fixes the order), so
    that ``z`` can be freed before ``B[MM, z]`` is allocated.

    Args:
      params: ``{"W": (n, m), "b": (n,)}``; ``"b"`` may be absent (no bias).
      z: input ``(m,)``, or ``(..., m)`` with leading batch axes.

    Returns:
      ``(n,)`` (or ``(..., n)``), in the promoted dtype of ``params`` and ``z`` (as ``jnp``
      computes ``W z + b``); each cotangent comes back in its argument's dtype.

    Raises:
      TypeError / ValueError: ``params`` keys or ranks are wrong, or ``W`` and ``z`` disagree.
    """
    params, z = _mm_arguments(params, z)
    return apply(_mm, params, z)


def _mm_arguments(params, z):
    """Check ``mm``'s arguments (trace time) and cast them to their common dtype."""
    p = arguments.params_dict(params, "params", ("W",), ("b",))
    z = arguments.float_array(z, "z", min_ndim=1)
    arguments.ndim(p["W"], "params['W']", 2)
    n, m = p["W"].shape
    if z.shape[-1] != m:
        raise ValueError(f"mm: params['W'] has shape {p['W'].shape} (n={n}, m={m}) but z has "
                         f"shape {z.shape}; z's last axis must have size m={m}")
    if "b" in p and p["b"].shape != (n,):
        raise ValueError(f"mm: params['b'] must have shape ({n},) to match params['W'] "
                         f"{p['W'].shape}, got {p['b'].shape}")
    return arguments.promote(p, z)


declare(mm, core=_mm, num_arrays=2, reference=reference.mm, family="linear", section="mm",
        shapes="`{\"W\": (n, m), \"b\": (n,)}` (`b` optional), `z (m,)` → `(n,)`",
        backward="`Wᵀv`, `v zᵀ`, `v`", tangent="`W ż + Ẇ z + ḃ`", layer="Dense",
        examples=lambda rng: [({"W": normal(rng, 6, 5), "b": normal(rng, 6)}, normal(rng, 5)),
                              ({"W": normal(rng, 17, 16), "b": normal(rng, 17)}, normal(rng, 16)),
                              ({"W": normal(rng, 3, 4)}, normal(rng, 4))])

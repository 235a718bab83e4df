"""The residual block and the two model families of the notes (7.22, 7.36–7.39), plus a CNN.

* ``residual``: ``Res(z) = z + σ(MM2(σ(MM1(z))))`` as one module whose backward is written out
  from its parts' backward functions: ``B[Res, z](v) = v + B[inner, z](v)``.
* ``mlp``: ``a[k] = σ(W[k] a[k−1] + b[k])``, last layer linear.
* ``resnet_s``: ``MM(Res(Res(· · · Res(MM(x)))))``; the blocks run in ``jax.lax.scan`` over
  stacked parameters, so compile time does not grow with depth.
* ``conv_net``: Conv1D → LN → ReLU → residual(Conv1D → ReLU) → MM, built with ``serial``.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import tree_util

from jbackprop import _checks, combinators as cb
from jbackprop._module import module
from jbackprop.activations import backward_from_output, relu
from jbackprop.linear import mm


def _vjp_of(activation: Callable) -> Callable:
    """``z -> (σ(z), pullback)`` from a jbackprop activation (or a ``functools.partial`` of one)."""
    kw = {}
    if isinstance(activation, functools.partial):
        activation, kw = activation.func, dict(activation.keywords)
    if not hasattr(activation, "vjp"):
        raise TypeError(f"activation must be a jbackprop module with a hand-written backward "
                        f"(jb.relu, jb.gelu, functools.partial(jb.leaky_relu, gamma=0.1), …), "
                        f"got {activation!r}")
    return lambda z: activation.vjp(z, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnames=("activation",))
def _residual(params, z, activation):
    return z + activation(mm(params["mm2"], activation(mm(params["mm1"], z))))


def _residual_fwd(params, z, activation):
    sigma = _vjp_of(activation)
    a1, mm1_back = mm.vjp(params["mm1"], z)           # each pullback holds its own residuals:
    h1, sigma1_back = sigma(a1)                       # MM1: W1, z;  σ: its mask or input
    a2, mm2_back = mm.vjp(params["mm2"], h1)          # MM2: W2, h1
    from_output = backward_from_output(activation)
    if from_output is not None:                       # σ'(a1) from h1, which MM2 keeps: the
        sigma1_back = tree_util.Partial(lambda h1, v: (from_output(h1, v),), h1)  # σ keeps none
    h2, sigma2_back = sigma(a2)
    return z + h2, (mm1_back, sigma1_back, mm2_back, sigma2_back)


def _residual_bwd(activation, res, v):
    mm1_back, sigma1_back, mm2_back, sigma2_back = res
    (a2_bar,) = sigma2_back(v)                        # B[σ, a2](v)
    mm2_bar, h1_bar = mm2_back(a2_bar)                # B[MM2, θ], B[MM2, h1]
    (a1_bar,) = sigma1_back(h1_bar)                   # B[σ, a1]
    mm1_bar, z_bar = mm1_back(a1_bar)                 # B[MM1, θ], B[MM1, z]
    return {"mm1": mm1_bar, "mm2": mm2_bar}, v + z_bar  # B[Res, z](v) = v + B[inner, z](v)


_residual.defvjp(_residual_fwd, _residual_bwd)


@module(_residual, batch_args=("z",), static_args=("activation",))
def residual(params, z, activation=relu):
    """Residual block ``z + σ(MM2(σ(MM1(z))))`` with ``B[Res, z](v) = v + B[inner, z](v)``.

    The backward is the chain of the parts' hand-written backwards (Algorithm 3 in small).
    Residuals: those of MM1, MM2 and the second σ (``W1, z, W2, h1``, and for ReLU the mask
    ``a2 > 0``). The first σ keeps none when its derivative is a function of its output
    (ReLU, leaky ReLU, sigmoid, tanh): it reads ``h1 = σ(a1)``, which MM2 keeps anyway.

    Args:
      params: ``{"mm1": {"W": (m, m), "b": (m,)}, "mm2": {"W": (m, m), "b": (m,)}}``.
      z: ``(m,)`` or ``(..., m)``.
      activation: a jbackprop activation, static (default ``jb.relu``).
    """
    if not isinstance(params, dict) or set(params) != {"mm1", "mm2"}:
        raise ValueError(f"residual: params must be a dict with keys ['mm1', 'mm2'], got "
                         f"{sorted(params) if isinstance(params, dict) else type(params).__name__}")
    z = _checks.float_array(z, "z", min_ndim=1)
    _vjp_of(activation)
    for name in ("mm1", "mm2"):
        W = _checks.params_dict(params[name], f"params[{name!r}]", ("W",), ("b",))["W"]
        if W.shape != (z.shape[-1],) * 2:
            raise ValueError(f"residual: params[{name!r}]['W'] must be square ({z.shape[-1]}, "
                             f"{z.shape[-1]}) to keep the width of z {z.shape}, got {W.shape}")
    return {"params": params, "z": z, "activation": activation}


def mlp_init(key: jax.Array, sizes: Sequence[int], dtype=jnp.float32) -> list[dict]:
    """MLP parameters ``[{"W": (m1, d), "b": (m1,)}, …]`` for widths ``sizes = [d, m1, …, m_r]``.

    The parameter count is ``(d+1)m1 + (m1+1)m2 + … + (m_{r−1}+1)m_r``.
    """
    if len(sizes) < 2 or any(int(n) != n or n < 1 for n in sizes):
        raise ValueError(f"mlp_init: sizes must be at least an input and an output width, each an "
                         f"integer ≥ 1, got {sizes}")
    keys = jax.random.split(key, len(sizes) - 1)
    return [cb.Dense(n, dtype=dtype).init(k, (m,)) for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def mlp(params: Sequence[dict], x: jax.Array, activation: Callable = relu) -> jax.Array:
    """``a[k] = σ(W[k] a[k−1] + b[k])`` for hidden layers; the last layer is linear (7.36)."""
    for p in params[:-1]:
        x = activation(mm(p, x))
    return mm(params[-1], x)


def _blocks_init(key, width, depth, dtype):
    """Stacked block parameters: each leaf has a leading ``depth`` axis (for ``lax.scan``).

    MM2 starts at 1/√depth of the He scale, so the residual stream stays bounded in depth.
    """
    k1, k2 = jax.random.split(key)
    block = lambda k1, k2: {"mm1": cb.Dense(width, dtype=dtype).init(k1, (width,)),
                            "mm2": cb.Dense(width, dtype=dtype, gain=depth ** -0.5).init(k2, (width,))}
    return jax.vmap(block)(jax.random.split(k1, depth), jax.random.split(k2, depth))


def resnet_s_init(key, in_dim: int, width: int, depth: int, out_dim: int, dtype=jnp.float32):
    """``{"proj": MM (width, in_dim) [only if in_dim ≠ width], "blocks": stacked, "head": MM}``."""
    for name, n in (("in_dim", in_dim), ("width", width), ("depth", depth), ("out_dim", out_dim)):
        if int(n) != n or n < 1:
            raise ValueError(f"resnet_s_init: {name} must be an integer ≥ 1, got {n}")
    kp, kb, kh = jax.random.split(key, 3)
    params = {"blocks": _blocks_init(kb, width, depth, dtype),
              "head": cb.Dense(out_dim, dtype=dtype).init(kh, (width,))}
    if in_dim != width:
        params["proj"] = cb.Dense(width, dtype=dtype).init(kp, (in_dim,))
    return params


def resnet_s(params: dict, x: jax.Array, activation: Callable = relu) -> jax.Array:
    """ResNet-S ``MM(Res(· · · Res(x)))`` (7.39), the blocks scanned over stacked parameters."""
    z = mm(params["proj"], x) if "proj" in params else x
    z, _ = jax.lax.scan(lambda z, p: (residual(p, z, activation), None), z, params["blocks"])
    return mm(params["head"], z)


def conv_net(channels: int = 16, k: int = 3, num_classes: int = 10, conv: str = "1d",
             reference: bool = False) -> cb.Layer:
    """A small CNN composed with ``serial``: Conv → LN → ReLU → Residual(Conv → ReLU) → MM.

    Per-example input ``(m, C)`` for ``conv="1d"`` or ``(h, w, C)`` for ``conv="2d"``.
    ``reference=True`` builds the same network from the pure-jnp references (for autodiff).
    """
    Conv = {"1d": cb.Conv1D, "2d": cb.Conv2D}[conv]
    relu_layer = cb.Activation(relu, reference=reference)
    return cb.serial(Conv(channels, k, reference=reference), cb.LayerNorm(reference=reference),
                     relu_layer,
                     cb.Residual(cb.serial(Conv(channels, k, reference=reference), relu_layer)),
                     cb.Flatten, cb.Dense(num_classes, reference=reference))

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

from jbackprop import reference
from jbackprop.modules import arguments, combinators as cb
from jbackprop.modules.activations import derivative_from_output, relu
from jbackprop.modules.linear import mm
from jbackprop.modules.registry import declare, normal, reference_of
from jbackprop.modules.rules import custom_rules
from jbackprop.modules.wiring import apply

# The public modules, re-exported by jbackprop.
__all__ = ["residual", "mlp_init", "mlp", "resnet_s_init", "resnet_s", "conv_net"]


def _linearize_of(activation: Callable) -> Callable:
    """``z -> (σ(z), Linearized)`` from a jbackprop activation (or a ``functools.partial`` of one)."""
    kw = {}
    if isinstance(activation, functools.partial):
        activation, kw = activation.func, dict(activation.keywords)
    if not hasattr(activation, "linearize"):
        raise TypeError(f"activation must be a jbackprop module with hand-written rules "
                        f"(jb.relu, jb.gelu, functools.partial(jb.leaky_relu, gamma=0.1), …), "
                        f"got {activation!r}")
    return lambda z: activation.linearize(z, **kw)


@tree_util.register_pytree_node_class
class _FromOutput:
    """σ's two rules read from its output ``u`` (kept by MM2 anyway): ``σ'(z) ⊙ x``."""

    def __init__(self, derivative, u):
        self.derivative, self.u = derivative, u

    def tree_flatten(self):
        return (self.u,), self.derivative

    @classmethod
    def tree_unflatten(cls, derivative, children):
        return cls(derivative, *children)

    def pullback(self, v):
        return (self.derivative(self.u, v),)

    def pushforward(self, z_dot):
        return self.derivative(self.u, z_dot)


@functools.partial(custom_rules, nondiff_argnames=("activation",), batch_argnums=(1,))
def _residual(params, z, activation):
    return z + activation(mm(params["mm2"], activation(mm(params["mm1"], z))))


def _residual_fwd(params, z, activation):
    sigma = _linearize_of(activation)
    a1, mm1 = mm.linearize(params["mm1"], z)          # each holds its own residuals:
    h1, sigma1 = sigma(a1)                            # MM1: W1, z;  σ: its mask or input
    a2, mm2 = mm.linearize(params["mm2"], h1)         # MM2: W2, h1
    derivative = derivative_from_output(activation)
    if derivative is not None:                        # σ'(a1) from h1, which MM2 keeps:
        sigma1 = _FromOutput(derivative, h1)          # σ keeps none
    h2, sigma2 = sigma(a2)
    return z + h2, (mm1, sigma1, mm2, sigma2)


def _residual_bwd(activation, res, v):
    mm1, sigma1, mm2, sigma2 = res
    (a2_bar,) = sigma2.pullback(v)                    # B[σ, a2](v)
    mm2_bar, h1_bar = mm2.pullback(a2_bar)            # B[MM2, θ], B[MM2, h1]
    (a1_bar,) = sigma1.pullback(h1_bar)               # B[σ, a1]
    mm1_bar, z_bar = mm1.pullback(a1_bar)             # B[MM1, θ], B[MM1, z]
    return {"mm1": mm1_bar, "mm2": mm2_bar}, v + z_bar  # B[Res, z](v) = v + B[inner, z](v)


def _residual_jvp(activation, res, params_dot, z_dot):
    mm1, sigma1, mm2, sigma2 = res                    # the chain rule forwards, part by part:
    a1_dot = mm1.pushforward(params_dot["mm1"], z_dot)   # W1 ż + Ẇ1 z + ḃ1
    h1_dot = sigma1.pushforward(a1_dot)                  # σ'(a1) ⊙ ȧ1
    a2_dot = mm2.pushforward(params_dot["mm2"], h1_dot)  # W2 ḣ1 + Ẇ2 h1 + ḃ2
    return z_dot + sigma2.pushforward(a2_dot)            # ż + σ'(a2) ⊙ ȧ2


_residual.defrules(_residual_fwd, _residual_bwd, _residual_jvp)


def residual(params, z, activation=relu):
    """Residual block ``z + σ(MM2(σ(MM1(z))))`` with ``B[Res, z](v) = v + B[inner, z](v)``.

    The backward is the chain of the parts' hand-written backwards (Algorithm 3 in small);
    the JVP ``ż + J_inner ż`` is the chain of their hand-written JVPs, input to output.
    Residuals: those of MM1, MM2 and the second σ (``W1, z, W2, h1``, and for ReLU the mask
    ``a2 > 0``). The first σ keeps none when its derivative is a function of its output
    (ReLU, leaky ReLU, sigmoid, tanh): it reads ``h1 = σ(a1)``, which MM2 keeps anyway.

    Args:
      params: ``{"mm1": {"W": (m, m), "b": (m,)}, "mm2": {"W": (m, m), "b": (m,)}}``.
      z: ``(m,)`` or ``(..., m)``.
      activation: a jbackprop activation, static (default ``jb.relu``).
    """
    params, z = _residual_arguments(params, z, activation)
    return apply(_residual, params, z, activation=activation)


def _residual_arguments(params, z, activation):
    """Check ``residual``'s arguments (trace time) and cast them to their common dtype."""
    if not isinstance(params, dict) or set(params) != {"mm1", "mm2"}:
        raise ValueError(f"residual: params must be a dict with keys ['mm1', 'mm2'], got "
                         f"{sorted(params) if isinstance(params, dict) else type(params).__name__}")
    z = arguments.float_array(z, "z", min_ndim=1)
    _linearize_of(activation)
    checked = {}
    for name in ("mm1", "mm2"):
        checked[name] = arguments.params_dict(params[name], f"params[{name!r}]", ("W",), ("b",))
        W = checked[name]["W"]
        if W.shape != (z.shape[-1],) * 2:
            raise ValueError(f"residual: params[{name!r}]['W'] must be square ({z.shape[-1]}, "
                             f"{z.shape[-1]}) to keep the width of z {z.shape}, got {W.shape}")
    return arguments.promote(checked, z)


def _block_init(key, in_shape, dtype, gain=1.0):
    """He-initialised MM1 and MM2 of width ``in_shape[-1]`` (MM2 scaled by ``gain``)."""
    k1, k2 = jax.random.split(key)
    m = in_shape[-1]
    return {"mm1": cb.Dense(m, dtype=dtype).init(k1, (m,)),
            "mm2": cb.Dense(m, dtype=dtype, gain=gain).init(k2, (m,))}


def _model_reference(model):
    """The reference of a module composed with ``activation``: the activation's reference."""
    return lambda params, x, activation=relu: model(params, x, reference_of(activation))


def _square(rng, m):
    return {"W": normal(rng, m, m, scale=0.5), "b": normal(rng, m)}


declare(residual, core=_residual, num_arrays=2, reference=_model_reference(reference.residual),
        examples=lambda rng: [({"mm1": _square(rng, m), "mm2": _square(rng, m)}, normal(rng, m))
                              for m in (5, 16)],
        family="models", section="residual-block",
        shapes="`{\"mm1\": MM, \"mm2\": MM}` square: `z + σ(MM2(σ(MM1(z))))`",
        backward="`v + B[inner, z](v)`", tangent="`ż + J_inner ż` (the parts' JVPs in order)",
        layer="ResidualBlock", init=_block_init,
        kinks="those of σ (ReLU: where a pre-activation is 0)")


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
    """``a[k] = σ(W[k] a[k−1] + b[k])`` for hidden layers; the last layer is linear (7.36).

    Args:
      params: a non-empty list (or tuple) of MM parameters ``{"W": (n, m), "b": (n,)}``, first
        layer first (``mlp_init``).
      x: one example ``(d,)``, or ``(..., d)`` with leading batch axes.
      activation: a jbackprop activation (default ``jb.relu``).
    """
    if not isinstance(params, (list, tuple)) or not params:
        raise TypeError(f"mlp: params must be a non-empty list of layers [{{'W': ..., 'b': ...}}, "
                        f"...] (as from jb.mlp_init), got "
                        f"{type(params).__name__ if params else 'an empty ' + type(params).__name__}")
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
    """ResNet-S ``MM(Res(· · · Res(x)))`` (7.39), the blocks scanned over stacked parameters.

    Args:
      params: ``{"blocks": stacked residual parameters, "head": MM}`` and, when the input width
        differs from the blocks' width, ``"proj": MM`` (``resnet_s_init``).
      x: one example ``(d,)``, or ``(..., d)`` with leading batch axes.
      activation: a jbackprop activation (default ``jb.relu``).
    """
    if not isinstance(params, dict) or not {"blocks", "head"} <= set(params) \
            or not set(params) <= {"proj", "blocks", "head"}:
        raise ValueError(f"resnet_s: params must be a dict with keys ['blocks', 'head'] "
                         f"(optionally 'proj'), as from jb.resnet_s_init; got "
                         f"{sorted(params) if isinstance(params, dict) else type(params).__name__}")
    z = mm(params["proj"], x) if "proj" in params else x
    z, _ = jax.lax.scan(lambda z, p: (residual(p, z, activation), None), z, params["blocks"])
    return mm(params["head"], z)


def _mlp_example(rng, sizes):
    return [{"W": normal(rng, n, m, scale=(2 / m) ** 0.5), "b": normal(rng, n, scale=0.1)}
            for m, n in zip(sizes[:-1], sizes[1:])]


def _resnet_s_example(rng, in_dim, width, depth, out_dim):
    """Blocks strong enough to matter: MM2 at 1.5 × the He scale."""
    stack = lambda scale: {"W": normal(rng, depth, width, width, scale=scale),
                           "b": normal(rng, depth, width, scale=0.1)}
    blocks = {"mm1": stack((2 / width) ** 0.5), "mm2": stack(1.5 * (2 / width) ** 0.5)}
    return {"proj": _mlp_example(rng, [in_dim, width])[0], "blocks": blocks,
            "head": _mlp_example(rng, [width, out_dim])[0]}


declare(mlp, reference=_model_reference(reference.mlp),
        examples=lambda rng: [(_mlp_example(rng, [5, 8, 6, 3]), normal(rng, 5)),
                              (_mlp_example(rng, [12, 16, 4]), normal(rng, 12))],
        family="models", section="mlp", uses=(mm.core, relu.core),
        shapes="`[{\"W\", \"b\"}, …]` (`mlp_init`), `x (d,)`; last layer linear",
        backward="composed: Algorithm 3", tangent="composed, input to output",
        kinks="those of σ")
declare(resnet_s, reference=_model_reference(reference.resnet_s),
        examples=lambda rng: [(_resnet_s_example(rng, 5, 6, 3, 3), normal(rng, 5)),
                              (_resnet_s_example(rng, 4, 8, 2, 2), normal(rng, 4))],
        family="models", section="resnet-s", uses=(mm.core, residual.core),
        shapes="`{\"proj\", \"blocks\", \"head\"}` (`resnet_s_init`), `x (d,)`",
        backward="composed; blocks in `lax.scan`", tangent="composed, in `lax.scan`",
        kinks="those of σ")


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

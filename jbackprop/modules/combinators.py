"""A stax-like way to build models from modules: ``Layer(init, apply)`` and combinators.

A ``Layer`` is a pair of pure functions, as in ``jax.example_libraries.stax``:

* ``init(key, in_shape) -> params`` for one example of shape ``in_shape``;
* ``apply(params, x) -> y`` on one example (batch it with ``jax.vmap``).

``serial`` chains layers (its params are the tuple of theirs), ``Residual(layer)`` is just
``z + layer(z)`` — JAX adds the two gradients at the branch, each of them hand-written.
Output shapes are found with ``jax.eval_shape``, so layers need not report them.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jbackprop.modules import registry
from jbackprop.modules.convolution import conv1d, conv2d
from jbackprop.modules.linear import mm
from jbackprop.modules.normalisation import batch_norm, layer_norm

Shape = Sequence[int]


class Layer(NamedTuple):
    """``init(key, in_shape) -> params`` beside ``apply(params, x) -> y`` (one example).

    ``output_shape(in_shape)``, when given, is the per-example output shape of a layer that
    cannot be traced on one example alone (``BatchNorm`` needs its named ``jax.vmap``)."""
    init: Callable[[jax.Array, Shape], Any]
    apply: Callable[[Any, jax.Array], jax.Array]
    output_shape: Callable[[Shape], tuple[int, ...]] | None = None


def out_shape(layer: Layer, params: Any, in_shape: Shape, dtype=jnp.float32) -> tuple[int, ...]:
    """The per-example output shape of ``layer`` (traced with ``jax.eval_shape``, no compute)."""
    if layer.output_shape is not None:
        return tuple(layer.output_shape(tuple(in_shape)))
    return jax.eval_shape(layer.apply, params, jax.ShapeDtypeStruct(tuple(in_shape), dtype)).shape


def he_normal(key, shape, fan_in, dtype=jnp.float32, gain=1.0):
    """N(0, 2/fan_in) weights (He et al.), suited to ReLU networks; ``gain`` rescales them."""
    return gain * jnp.sqrt(2.0 / fan_in).astype(dtype) * jax.random.normal(key, shape, dtype)


def _pick(module: Callable, reference: bool) -> Callable:
    """The module, or its pure-jnp reference (from the registry, for autodiff runs)."""
    return registry.reference_of(module) if reference else module


def Dense(n: int, *, bias: bool = True, dtype=jnp.float32, gain: float = 1.0,
          reference: bool = False) -> Layer:
    """The MM module ``W z + b`` with ``n`` outputs: params ``{"W": (n, m), "b": (n,)}``.

    Every layer takes ``reference=True`` to apply the pure-jnp reference instead of the module
    (the same mathematics, differentiated by JAX: ``backward="autodiff"``)."""
    def init(key, in_shape):
        (m,) = in_shape
        p = {"W": he_normal(key, (n, m), m, dtype, gain)}
        if bias:
            p["b"] = jnp.zeros((n,), dtype)
        return p
    return Layer(init, _pick(mm, reference))


def Activation(fn: Callable[..., jax.Array], *, reference: bool = False, **hyper) -> Layer:
    """An element-wise module (``jb.relu``, ``jb.gelu``, …) with no parameters."""
    fn = _pick(fn, reference)
    return Layer(lambda key, in_shape: (), lambda params, x: fn(x, **hyper))


def layer(module: Callable, *, dtype=jnp.float32, reference: bool = False, **hyper) -> Layer:
    """The layer of any declared module whose parameters follow from its input shape.

    ``layer(jb.elu, alpha=0.5)``, ``layer(jb.layer_norm, eps=1e-6)``: the parameters come from
    the module's declared ``init`` (none for the activations and LN-S); the hyper-parameters
    are fixed. The layers named in the registry (``Relu``, ``Elu``, ``LeakyRelu``, ``LayerNormS``,
    ``ResidualBlock``, …) are ``layer(module)`` with the defaults.
    """
    decl = registry.of(module)
    if decl.layer is None:
        raise TypeError(f"layer: {decl.name} has no layer (a loss takes labels; a model is "
                        "built from layers with serial)")
    if decl.init is None and decl.layer in _HAND_WRITTEN:
        raise TypeError(f"layer: {decl.name} needs sizes that its input does not give; use "
                        f"combinators.{decl.layer}")
    apply = _pick(decl.fn, reference)
    if decl.init is None:
        return Layer(lambda key, in_shape: (), lambda params, x: apply(x, **hyper))
    return Layer(lambda key, in_shape: decl.init(key, tuple(in_shape), dtype),
                 lambda params, x: apply(params, x, **hyper))


def LayerNorm(*, eps: float = 1e-5, per_feature: bool = True, dtype=jnp.float32,
              reference: bool = False) -> Layer:
    """LN over the last axis, ``β + γ · LN-S(z)``; scalar ``β, γ`` (the notes) or per feature."""
    def init(key, in_shape):
        shape = (in_shape[-1],) if per_feature else ()
        return {"beta": jnp.zeros(shape, dtype), "gamma": jnp.ones(shape, dtype)}
    ln = _pick(layer_norm, reference)
    return Layer(init, lambda params, x: ln(params, x, eps=eps))


def BatchNorm(axis_name: Any = "batch", *, eps: float = 1e-5, dtype=jnp.float32,
              reference: bool = False) -> Layer:
    """Batch norm of one example across ``jax.vmap(apply, axis_name=axis_name)``: apply the
    model under that vmap (training-mode statistics; ``jb.batch_norm``). Params ``β``, ``γ``
    per feature (the last axis)."""
    def init(key, in_shape):
        return {"beta": jnp.zeros(in_shape[-1:], dtype), "gamma": jnp.ones(in_shape[-1:], dtype)}
    bn = _pick(batch_norm, reference)
    return Layer(init, lambda params, x: bn(params, x, eps=eps, axis_name=axis_name), tuple)


def _Conv(conv, spatial: int, out_channels: int, k: int, dtype, reference: bool) -> Layer:
    def init(key, in_shape):
        if len(in_shape) != spatial + 1:
            raise ValueError(f"Conv{spatial}D expects per-example input shape "
                             f"({'m' if spatial == 1 else 'h, w'}, C), got {tuple(in_shape)}")
        c = in_shape[-1]
        shape = (k,) * spatial + (c, out_channels)
        return {"w": he_normal(key, shape, c * k ** spatial, dtype),
                "b": jnp.zeros((out_channels,), dtype)}
    return Layer(init, _pick(conv, reference))


def Conv1D(out_channels: int, k: int = 3, *, dtype=jnp.float32, reference: bool = False) -> Layer:
    """Conv1D with ``k`` odd, same padding: ``(m, C) -> (m, out_channels)``."""
    return _Conv(conv1d, 1, out_channels, k, dtype, reference)


def Conv2D(out_channels: int, k: int = 3, *, dtype=jnp.float32, reference: bool = False) -> Layer:
    """Conv2D with a ``k × k`` filter, same padding: ``(h, w, C) -> (h, w, out_channels)``."""
    return _Conv(conv2d, 2, out_channels, k, dtype, reference)


Flatten = Layer(lambda key, in_shape: (), lambda params, x: jnp.reshape(x, (-1,)))


def serial(*layers: Layer) -> Layer:
    """Compose layers left to right; params are the tuple of each layer's params."""
    def init(key, in_shape):
        params, shape = [], tuple(in_shape)
        for layer, k in zip(layers, jax.random.split(key, len(layers))):
            p = layer.init(k, shape)
            shape = out_shape(layer, p, shape)
            params.append(p)
        return tuple(params)

    def apply(params, x):
        if len(params) != len(layers):
            raise ValueError(f"serial: expected params for {len(layers)} layers, got {len(params)}")
        for layer, p in zip(layers, params):
            x = layer.apply(p, x)
        return x
    return Layer(init, apply)


def Residual(layer: Layer) -> Layer:
    """``z + layer(z)``; the layer must keep the shape of its input."""
    def init(key, in_shape):
        p = layer.init(key, in_shape)
        if out_shape(layer, p, in_shape) != tuple(in_shape):
            raise ValueError(f"Residual: the inner layer maps {tuple(in_shape)} to "
                             f"{out_shape(layer, p, in_shape)}; it must keep the shape")
        return p
    return Layer(init, lambda params, z: z + layer.apply(params, z))


def _generated() -> dict[str, Callable[[], Layer]]:
    """The registry's layer names that no factory above defines: each is ``layer(module)``."""
    return {d.layer: d.fn for d in registry.declarations()
            if d.layer is not None and d.layer not in _HAND_WRITTEN}


_HAND_WRITTEN = ("Dense", "LayerNorm", "BatchNorm", "Conv1D", "Conv2D")


def __getattr__(name: str) -> Layer:
    """``combinators.Relu``, ``combinators.Elu``, …: generated from the registry on first use."""
    fn = _generated().get(name) if not name.startswith("_") else None
    if fn is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return layer(fn)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_generated()))

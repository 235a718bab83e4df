"""The configurations of ``jbackprop bench``: each model written once, built from two libraries.

Every configuration is one function ``apply(lib, params, x)`` on **one example**, written
against a library namespace ``lib`` with ``mm``, ``relu``, ``layer_norm``, ``residual`` and
``cross_entropy_loss``:

* ``lib = jbackprop`` gives the **manual** version: every module runs its hand-written backward;
* ``lib = jbackprop.reference`` gives the **autodiff** version: the same mathematics in plain
  ``jax.numpy``, differentiated by ``jax.grad``.

Both are batched the same way (``jax.vmap`` over the examples) and trained by the same step, so
the only difference is who wrote the backward. Where the modules also take leading batch axes,
a third version, **manual, batched**, calls them on the whole batch directly, to compare the
vmap-batched per-example pipeline with it. Optional columns (PyTorch eager and
``torch.compile``, Equinox) are built in ``bench_external``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

import jbackprop as jb
from jbackprop.modules import combinators as cb
from jbackprop import reference

LIBS = {"manual": jb, "autodiff": reference}


class Problem(NamedTuple):
    """One configuration, built: parameters, a batch, and the mean loss of each version."""
    params: Any
    x: jax.Array                     # (B, ...) inputs
    y: jax.Array                     # (B,) integer labels
    losses: dict[str, Callable]      # version -> loss(params, x, y), the mean over the batch
    matmul_flops: float              # 6·B·(weights in matrix multiplies) per training step
    spec: dict                       # sizes, for the external (PyTorch, Equinox) builders


class Config(NamedTuple):
    name: str
    description: str
    build: Callable[[bool], Problem]   # quick -> Problem (quick: small shapes for tests)


def _data(batch, in_shape, classes, key=1):
    kx, ky = jax.random.split(jax.random.PRNGKey(key))
    return (jax.random.normal(kx, (batch, *in_shape), jnp.float32),
            jax.random.randint(ky, (batch,), 0, classes))


def per_example(lib, apply: Callable) -> Callable:
    """Mean cross-entropy of ``apply`` vmapped over the batch (modules on one example)."""
    def loss(params, x, y):
        per = jax.vmap(lambda xi, yi: lib.cross_entropy_loss(apply(lib, params, xi), yi))
        return jnp.mean(per(x, y))
    return loss


def _batched(apply: Callable) -> Callable:
    """Mean cross-entropy of the manual modules called on the whole batch (leading axes)."""
    return lambda params, x, y: jnp.mean(jb.cross_entropy_loss(apply(jb, params, x), y))


def _problem(apply, params, x, y, flops, spec, batched=True) -> Problem:
    losses = {v: per_example(lib, apply) for v, lib in LIBS.items()}
    if batched:
        losses["manual, batched"] = _batched(apply)
    return Problem(params, x, y, losses, float(flops), spec)


def _weights(params) -> int:
    """Number of entries of the matrices (``W``) in ``params``: the matmul FLOP count's basis."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(a.size for path, a in leaves if getattr(path[-1], "key", None) == "W")


# --- MLP (7.36) ------------------------------------------------------------------------------
def _mlp_apply(lib, params, x):
    return lib.mlp(params, x)


def _mlp(sizes, batch):
    def build(quick):
        s, b = ([sizes[0] // 8] + [n // 8 for n in sizes[1:-1]] + [sizes[-1]], 8) if quick \
            else (sizes, batch)
        params = jb.mlp_init(jax.random.PRNGKey(0), s)
        x, y = _data(b, (s[0],), s[-1])
        return _problem(_mlp_apply, params, x, y, 6 * b * _weights(params),
                        {"kind": "mlp", "sizes": s, "batch": b})
    return build


# --- ResNet-S (7.39), the blocks scanned -----------------------------------------------------
def resnet_apply(lib, params, x):
    z = lib.mm(params["proj"], x)
    z, _ = jax.lax.scan(lambda z, p: (lib.residual(p, z), None), z, params["blocks"])
    return lib.mm(params["head"], z)


def _resnet(d, width, depth, classes, batch):
    def build(quick):
        w, n, b = (16, 4, 8) if quick else (width, depth, batch)
        params = jb.resnet_s_init(jax.random.PRNGKey(0), d, w, n, classes)
        x, y = _data(b, (d,), classes)
        return _problem(resnet_apply, params, x, y, 6 * b * _weights(params),
                        {"kind": "resnet", "in": d, "width": w, "depth": n, "classes": classes,
                         "batch": b})
    return build


# --- a layer-norm-heavy residual net: z + ReLU(LN(MM(z))) blocks ------------------------------
def _ln_apply(lib, params, x):
    z = x
    for p in params["blocks"]:
        z = z + lib.relu(lib.layer_norm(p["ln"], lib.mm(p["mm"], z)))
    return lib.mm(params["head"], z)


def _ln_net(width, blocks, classes, batch):
    def build(quick):
        w, b = (16, 8) if quick else (width, batch)
        keys = jax.random.split(jax.random.PRNGKey(0), blocks + 1)
        params = {"blocks": [{"mm": cb.Dense(w).init(k, (w,)),
                              "ln": cb.LayerNorm().init(k, (w,))} for k in keys[:-1]],
                  "head": cb.Dense(classes).init(keys[-1], (w,))}
        x, y = _data(b, (w,), classes)
        return _problem(_ln_apply, params, x, y, 6 * b * _weights(params),
                        {"kind": "ln", "width": w, "blocks": blocks, "classes": classes,
                         "batch": b})
    return build


# --- convolutional nets (models.conv_net: Conv → LN → ReLU → Res(Conv → ReLU) → MM) -----------
def _conv(conv, in_shape, channels, classes, batch):
    def build(quick):
        shape, c, b = (tuple(min(n, 12) for n in in_shape[:-1]) + (2,), 4, 4) if quick \
            else (in_shape, channels, batch)
        net = {v: jb.conv_net(c, 3, classes, conv, reference=v == "autodiff") for v in LIBS}
        params = net["manual"].init(jax.random.PRNGKey(0), shape)
        x, y = _data(b, shape, classes)
        apply = lambda lib, p, xi: net["autodiff" if lib is reference else "manual"].apply(p, xi)
        k = 3 ** (len(shape) - 1)                                   # taps of a 3 or 3×3 kernel
        conv_flops = 6 * b * math.prod(shape[:-1]) * k * (shape[-1] * c + c * c)   # two convs
        return _problem(apply, params, x, y, conv_flops + 6 * b * _weights(params),
                        {"kind": "conv", "conv": conv, "shape": shape, "channels": c,
                         "batch": b}, batched=False)
    return build


# --- a linear classifier with many classes: the cross-entropy dominates -----------------------
def _classifier_apply(lib, params, x):
    return lib.mm(params, x)


def _many_classes(d, classes, batch):
    def build(quick):
        n, b = (100, 8) if quick else (classes, batch)
        params = cb.Dense(n).init(jax.random.PRNGKey(0), (d,))
        x, y = _data(b, (d,), n)
        return _problem(_classifier_apply, params, x, y, 6 * b * d * n,
                        {"kind": "classifier", "in": d, "classes": n, "batch": b})
    return build


CONFIGS = [
    Config("mlp-large", "MLP 784→1024×4→10, batch 256", _mlp([784] + [1024] * 4 + [10], 256)),
    Config("mlp-small", "MLP 784→256×8→10, batch 64", _mlp([784] + [256] * 8 + [10], 64)),
    Config("resnet-s", "ResNet-S 784→256, depth 64 (scan), batch 128",
           _resnet(784, 256, 64, 10, 128)),
    Config("layernorm-net", "8 × (z + ReLU(LN(MM z))), width 512, batch 1024",
           _ln_net(512, 8, 10, 1024)),
    Config("conv1d", "Conv1D net, length 1024 × 16 ch → 32 ch, batch 32",
           _conv("1d", (1024, 16), 32, 10, 32)),
    Config("conv2d", "Conv2D net, 32×32 × 16 ch → 32 ch, batch 32",
           _conv("2d", (32, 32, 16), 32, 10, 32)),
    Config("xent-10k", "cross-entropy, 10 000 classes: MM 512→10000, batch 256",
           _many_classes(512, 10_000, 256)),
]


def select(names: list[str] | None) -> list[Config]:
    """The configurations named (all if ``names`` is empty); unknown names raise ValueError."""
    if not names:
        return CONFIGS
    known = {c.name: c for c in CONFIGS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; choose from {sorted(known)}")
    return [known[n] for n in names]


__all__ = ["CONFIGS", "Config", "Problem", "select"]

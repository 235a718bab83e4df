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
vmap-batched per-example pipeline with it.

Each configuration also names its **baseline**: what a user who does not use jbackprop would
write and differentiate with ``jax.grad``. For the dense models that is the reference itself
(plain ``jnp``: ``W @ z + b``, mean and variance, logsumexp). For the convolutional ones it is
not: the reference computes a convolution by ``k`` (or ``k²``) shifted slices, which nobody
writes; a user calls ``jax.lax.conv_general_dilated`` on the whole NHWC batch, as Flax and
Equinox do. Those configurations get a fourth version, **lax.conv** (``lax_conv_apply``), and
it is their baseline; the shifted-slice reference stays as a secondary, labelled column.
Optional columns (PyTorch eager and ``torch.compile``, Equinox, Flax) are built in
``bench_external``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

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
    spec: dict                       # sizes, for the external (PyTorch, Equinox, Flax) builders
    baseline: str = "autodiff"       # the version a user without jbackprop would write


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


def _problem(apply, params, x, y, flops, spec, batched=True, extra=None,
             baseline="autodiff") -> Problem:
    losses = {v: per_example(lib, apply) for v, lib in LIBS.items()}
    if batched:
        losses["manual, batched"] = _batched(apply)
    losses.update(extra or {})
    return Problem(params, x, y, losses, float(flops), spec, baseline)


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
def _conv_layers(layers: str, c: int, classes: int, conv: str, reference: bool):
    """``"net"``: ``jb.conv_net``; ``"pair"``: Conv → ReLU → Conv → MM (the convolutions and
    nothing else of note: the comparison with ``lax.conv`` of the convolution alone)."""
    if layers == "net":
        return jb.conv_net(c, 3, classes, conv, reference=reference)
    Conv = {"1d": cb.Conv1D, "2d": cb.Conv2D}[conv]
    return cb.serial(Conv(c, 3, reference=reference), cb.Activation(jb.relu, reference=reference),
                     Conv(c, 3, reference=reference), cb.Flatten,
                     cb.Dense(classes, reference=reference))


def lax_conv(p, x):
    """A "same" convolution as a user writes it: ``lax.conv_general_dilated`` on the batch
    ``x (B, *S, C)``, kernel ``p["w"] (*K, C, C')`` (``NHWC`` / ``HWIO``, or ``NWC`` / ``WIO``),
    stride 1, ``padding="SAME"`` (ℓ zeros each side for ``k = 2ℓ + 1``: ``jb.conv2d``'s)."""
    sp = "HW"[-(x.ndim - 2):]
    return jax.lax.conv_general_dilated(
        x, p["w"], (1,) * (x.ndim - 2), "SAME",
        dimension_numbers=("N" + sp + "C", sp + "IO", "N" + sp + "C")) + p["b"]


def lax_conv_apply(layers: str, params, x):
    """The logits of the ``"net"`` or ``"pair"`` configuration on the **batch** ``x``, written
    as a user without jbackprop writes it: ``lax.conv_general_dilated`` (``lax_conv``),
    ``jax.nn.relu``, layer norm from ``mean`` and ``var``, ``x @ W.T + b`` — all differentiated
    by ``jax.grad``. Same parameters (``params``) as ``_conv_layers(layers, ...)``."""
    if layers == "pair":
        c1, _, c2, _, head = params
        z = lax_conv(c2, jax.nn.relu(lax_conv(c1, x)))
    else:
        c1, ln, _, (c2, _), _, head = params
        z = lax_conv(c1, x)
        mu, var = jnp.mean(z, -1, keepdims=True), jnp.var(z, -1, keepdims=True)
        z = jax.nn.relu(ln["beta"] + ln["gamma"] * (z - mu) / jnp.sqrt(var + 1e-5))
        z = z + jax.nn.relu(lax_conv(c2, z))
    return z.reshape(z.shape[0], -1) @ head["W"].T + head["b"]


def lax_conv_loss(layers: str) -> Callable:
    """Mean cross-entropy (optax's) of ``lax_conv_apply``: the ``lax.conv`` version."""
    def loss(params, x, y):
        logits = lax_conv_apply(layers, params, x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    return loss


def _conv(conv, in_shape, channels, classes, batch, layers="net"):
    def build(quick):
        shape, c, b = (tuple(min(n, 12) for n in in_shape[:-1]) + (2,), 4, 4) if quick \
            else (in_shape, channels, batch)
        net = {v: _conv_layers(layers, c, classes, conv, reference=v == "autodiff") for v in LIBS}
        params = net["manual"].init(jax.random.PRNGKey(0), shape)
        x, y = _data(b, shape, classes)
        apply = lambda lib, p, xi: net["autodiff" if lib is reference else "manual"].apply(p, xi)
        k = 3 ** (len(shape) - 1)                                   # taps of a 3 or 3×3 kernel
        conv_flops = 6 * b * math.prod(shape[:-1]) * k * (shape[-1] * c + c * c)   # two convs
        return _problem(apply, params, x, y, conv_flops + 6 * b * _weights(params),
                        {"kind": "conv", "conv": conv, "layers": layers, "shape": shape,
                         "channels": c, "classes": classes, "batch": b}, batched=False,
                        extra={"lax.conv": lax_conv_loss(layers)}, baseline="lax.conv")
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


# --- a decoder-only Transformer, next-token cross-entropy over every position ----------------
def _transformer(vocab, d_model, heads, depth, n, batch):
    def build(quick):
        v, d, h, k, m, b = (32, 16, 2, 2, 16, 4) if quick else (vocab, d_model, heads, depth,
                                                              n, batch)
        params = jb.transformer_init(jax.random.PRNGKey(0), v, d, h, k, m)
        ids = jax.random.randint(jax.random.PRNGKey(1), (b, m + 1), 0, v)
        x, y = ids[:, :-1], ids[:, 1:]                  # predict the next token everywhere

        def loss_of(lib):
            def loss(params, x, y):
                per = jax.vmap(lambda xi, yi: jax.vmap(lib.cross_entropy_loss)(
                    lib.transformer(params, xi), yi))
                return jnp.mean(per(x, y))
            return loss
        attention_flops = 6 * b * k * 2 * m * m * d      # q kᵀ and P v, forward and backward
        return Problem(params, x, y, {ver: loss_of(lib) for ver, lib in LIBS.items()},
                       float(6 * b * m * _weights(params) + attention_flops),
                       {"kind": "transformer", "batch": b, "n": m})
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
    Config("conv2d-pair", "Conv2D → ReLU → Conv2D → MM, 32×32 × 16 ch → 32 ch, batch 32",
           _conv("2d", (32, 32, 16), 32, 10, 32, layers="pair")),
    Config("xent-10k", "cross-entropy, 10 000 classes: MM 512→10000, batch 256",
           _many_classes(512, 10_000, 256)),
    Config("transformer", "Transformer d_model 256, 4 heads, depth 4 (scan), n 256, vocab 512, "
           "batch 16", _transformer(512, 256, 4, 4, 256, 16)),
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


__all__ = ["CONFIGS", "Config", "Problem", "select", "lax_conv", "lax_conv_apply",
           "lax_conv_loss"]

"""Training: jit-compiled steps with the hand-written backward and an optax optimiser.

* ``make_model`` / ``make_loss``: the model and per-batch loss, ``backward="manual"`` (jbackprop
  modules: ``jax.grad`` runs the hand-written rules) or ``"autodiff"`` (the pure-jnp reference
  of the same mathematics, differentiated by JAX).
* ``train_epoch``: Algorithm 2 — one epoch of mini-batch SGD sampling without replacement
  (a ``jax.random`` permutation per epoch), run as one ``lax.scan`` of jit-compiled steps
  (``train_step``); ``distributed.py`` runs both data-parallel over several devices.
* ``algorithm1``: Algorithm 1 — plain SGD on one random example per step.
* ``per_example_grads``: ``jax.vmap`` of the gradient, with optional per-example clipping (DP-SGD).
* ``fit``: the loop behind ``jbackprop train`` (``trainer.py``: checkpoints, metrics, curves).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import jbackprop as jb
from jbackprop.modules import registry


SEED_MAX = 2**32 - 1                # jax.random.PRNGKey keeps 32 bits (without x64)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that determines a run (a seed reproduces it exactly)."""
    model: str = "mlp"              # mlp | resnet-s | cnn | transformer
    dataset: str = "digits"         # digits | xor | housing | sort | PATH.npz
    optimizer: str = "adam"         # sgd | momentum | adam
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 100
    seed: int = 0
    backward: str = "manual"        # manual | autodiff
    width: int = 256
    depth: int = 3                  # ResNet-S blocks, Transformer blocks
    heads: int = 4                  # Transformer attention heads (they divide the width)
    weight_decay: float = 1e-4
    input_noise: float = 0.6        # std of Gaussian noise added to training inputs
    schedule: str = "cosine"        # cosine | constant
    devices: int = 1                # data parallel over this many devices (distributed.py)
    model_parallel: int = 1         # of which this many split the MLP's layers ("model" axis)

    def __post_init__(self):
        """Refuse numbers that cannot train, naming the field (the CLI's flags are these fields)."""
        for name in ("epochs", "batch_size", "width", "depth", "heads", "model_parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
        for name, low_open in (("lr", True), ("weight_decay", False), ("input_noise", False)):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > 0 if low_open else value >= 0)):
                raise ValueError(f"{name} must be a finite number {'>' if low_open else '≥'} 0, "
                                 f"got {value!r}")
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
            raise ValueError(f"seed must be an integer in 0..{SEED_MAX} (2**32 - 1: seeds are "
                             f"32-bit, larger ones would repeat smaller ones), got {self.seed!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    epoch: jax.Array                 # completed epochs


def make_model(cfg: Config, in_shape: tuple[int, ...], num_outputs: int):
    """``(init(key) -> params, apply(params, x) -> output)`` for one example of shape ``in_shape``.

    The MLP and ResNet-S see an example as a vector: one of shape ``(2, 2)`` (say) is flattened
    to ``(4,)``. The CNN takes a vector ``(d,)`` as an 8×8-style square image when ``d`` is a
    square above 4 (else a signal ``(d, 1)``, Conv1D), ``(h, w)`` as an image of one channel and
    ``(h, w, C)`` as an image of ``C`` channels (Conv2D); other ranks are refused."""
    manual = cfg.backward == "manual"
    if cfg.backward not in ("manual", "autodiff"):
        raise ValueError(f"backward must be 'manual' or 'autodiff', got {cfg.backward!r}")
    in_shape = tuple(int(n) for n in in_shape)
    d = 1
    for n in in_shape:
        d *= n
    if cfg.model in ("mlp", "resnet-s"):
        if cfg.model == "mlp":
            sizes = [d, cfg.width, cfg.width, num_outputs]
            init, apply = (lambda key: jb.mlp_init(key, sizes)), _pick(jb.mlp, manual)
        else:
            init, apply = (lambda key: jb.resnet_s_init(key, d, cfg.width, cfg.depth, num_outputs),
                           _pick(jb.resnet_s, manual))
        if len(in_shape) != 1:                     # (h, w), (h, w, C), …: a vector of d features
            module = apply
            apply = lambda p, x: module(p, x.reshape(x.shape[:x.ndim - len(in_shape)] + (d,)))
        return init, apply
    if cfg.model == "cnn":
        if len(in_shape) == 1:
            side = int(round(d ** 0.5))
            image = side * side == d and side > 2  # square images (digits 8×8): Conv2D
            shape = (side, side, 1) if image else (d, 1)
        elif len(in_shape) in (2, 3):
            image, shape = True, in_shape + (1,) * (3 - len(in_shape))
        else:
            raise ValueError(f"the cnn takes examples of shape (features,), (height, width) or "
                             f"(height, width, channels); these have shape {in_shape}: use "
                             "--model mlp or resnet-s, which flatten them")
        net = jb.conv_net(channels=16, k=3, num_classes=num_outputs, conv="2d" if image else "1d",
                          reference=not manual)
        return (lambda key: net.init(key, shape)), (lambda p, x: net.apply(p, x.reshape(shape)))
    if cfg.model == "transformer":
        if len(in_shape) != 1:
            raise ValueError(f"the transformer takes sequences of token ids, shape (n,); these "
                             f"examples have shape {in_shape}: use --dataset sort")
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} (the transformer's d_model) must be divisible "
                             f"by heads {cfg.heads}")
        n = in_shape[0]
        return ((lambda key: jb.transformer_init(key, num_outputs, cfg.width, cfg.heads,
                                                 cfg.depth, n)),
                _pick(jb.transformer, manual))
    raise ValueError(f"unknown model {cfg.model!r}: choose mlp, resnet-s, cnn or transformer")


# What `jbackprop train --model transformer` uses for the flags it is not given (the Config
# defaults suit the MLP on the digits): a small model that sorts in well under a minute.
TRANSFORMER_DEFAULTS = {"width": 64, "depth": 2, "heads": 4, "epochs": 5, "lr": 3e-3,
                        "batch_size": 64, "weight_decay": 0.0, "dataset": "sort"}


def _pick(module: Callable, manual: bool) -> Callable:
    """The module (hand-written backward) or its declared pure-jnp reference (autodiff)."""
    return module if manual else registry.reference_of(module)


def make_loss(apply: Callable, task: str, backward: str) -> Callable:
    """Mean over the batch of the per-example loss (cross-entropy or squared error, 7.2; for a
    sequence, the mean cross-entropy over the positions that have a target, ``y ≥ 0``)."""
    loss_module = jb.mse_loss if task == "regression" else jb.cross_entropy_loss
    per_example = _pick(loss_module, backward == "manual")
    if task == "sequence":
        per_example = _sequence_loss(jax.vmap(per_example))

    def loss(p, x, y):
        _check_examples(x, y, "loss")
        return jnp.mean(jax.vmap(lambda x, y: per_example(apply(p, x), y))(x, y))
    return loss


def _sequence_loss(per_position: Callable) -> Callable:
    """Logits ``(n, vocab)`` and targets ``(n,)`` (−1: none) → the mean over the targets."""
    def loss(logits, y):
        has = y >= 0
        values = per_position(logits, jnp.where(has, y, 0))
        return jnp.sum(jnp.where(has, values, 0)) / jnp.maximum(jnp.sum(has), 1)
    return loss


def _check_examples(x, y, where: str) -> None:
    """``x`` and ``y`` hold the same number of examples, at least one (checked at trace time)."""
    if jnp.ndim(x) == 0 or jnp.shape(x)[:1] != jnp.shape(y)[:1]:
        raise ValueError(f"{where}: x and y must have one row per example, got x {jnp.shape(x)} "
                         f"and y {jnp.shape(y)}")
    if jnp.shape(x)[0] == 0:
        raise ValueError(f"{where}: x is an empty batch (shape {jnp.shape(x)}); the mean over "
                         "no examples is undefined")


def make_optimizer(cfg: Config, steps: int) -> optax.GradientTransformation:
    lr = optax.cosine_decay_schedule(cfg.lr, max(steps, 1)) if cfg.schedule == "cosine" else cfg.lr
    if cfg.optimizer == "sgd":
        opt = optax.sgd(lr)
    elif cfg.optimizer == "momentum":
        opt = optax.sgd(lr, momentum=0.9)
    elif cfg.optimizer == "adam":     # decoupled weight decay (AdamW)
        return optax.adamw(lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}: choose sgd, momentum or adam")
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt) if cfg.weight_decay else opt


def train_step(loss: Callable, opt: optax.GradientTransformation, params: Any, opt_state: Any,
               xb: jax.Array, yb: jax.Array) -> tuple[Any, Any, jax.Array]:
    """One step on the mini-batch ``(xb, yb)``: the loss, its gradient (``jax.grad``: the
    hand-written backwards) and the optax update. Returns ``(params, opt_state, loss)``."""
    value, grads = jax.value_and_grad(loss)(params, xb, yb)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


def epoch_batches(n: int, key: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """The mini-batches of one ``train_epoch``: ``(indices (steps, batch_size), noise key)``,
    from a permutation of the ``n`` examples drawn with ``key``."""
    k_perm, k_noise = jax.random.split(key)
    return jax.random.permutation(k_perm, n)[:(n // batch_size) * batch_size].reshape(
        -1, batch_size), k_noise


def mini_batch(x: jax.Array, y: jax.Array, idx: jax.Array, i: jax.Array | int, k_noise: jax.Array,
               input_noise: float = 0.0, batch_sharding: Any = None) -> tuple[jax.Array, jax.Array]:
    """Step ``i``'s mini-batch ``(xb, yb)`` of ``train_epoch``: rows ``idx`` of ``x, y``, with
    Gaussian noise of std ``input_noise`` drawn from ``fold_in(k_noise, i)`` on ``xb``."""
    xb, yb = x[idx], y[idx]
    if batch_sharding is not None:
        xb, yb = jax.lax.with_sharding_constraint((xb, yb), batch_sharding)
    if input_noise:
        xb = xb + input_noise * jax.random.normal(jax.random.fold_in(k_noise, i), xb.shape, xb.dtype)
    return xb, yb


def train_epoch(loss: Callable, opt: optax.GradientTransformation, state: TrainState,
                x: jax.Array, y: jax.Array, key: jax.Array, batch_size: int,
                input_noise: float = 0.0, batch_sharding: Any = None) -> tuple[TrainState, jax.Array]:
    """Algorithm 2: a permutation of the training set, then one step per mini-batch of
    ``batch_size`` examples (the last ``n mod batch_size`` of the permutation wait for the next
    epoch). Returns the new state and the loss of every step. Jit it with static
    ``loss, opt, batch_size, input_noise``. ``batch_sharding`` (a ``jax.sharding.Sharding``)
    constrains each mini-batch to it: data parallelism, see ``distributed.py``."""
    _check_examples(x, y, "train_epoch")
    if not 1 <= batch_size <= x.shape[0]:
        raise ValueError(f"train_epoch: batch_size must be in 1..{x.shape[0]} (the examples in x), "
                         f"got {batch_size}")
    batches, k_noise = epoch_batches(x.shape[0], key, batch_size)

    def step(carry, inputs):
        idx, i = inputs
        xb, yb = mini_batch(x, y, idx, i, k_noise, input_noise, batch_sharding)
        params, opt_state, value = train_step(loss, opt, *carry, xb, yb)
        return (params, opt_state), value

    (params, opt_state), losses = jax.lax.scan(
        step, (state.params, state.opt_state), (batches, jnp.arange(batches.shape[0])))
    return TrainState(params, opt_state, state.epoch + 1), losses


def algorithm1(loss: Callable, params: Any, x: jax.Array, y: jax.Array, key: jax.Array,
               lr: float, steps: int) -> tuple[Any, jax.Array]:
    """Algorithm 1: ``θ := θ − α ∇θ J^{(j)}(θ)`` for a uniformly random example ``j`` per step."""
    _check_examples(x, y, "algorithm1")

    def step(params, k):
        j = jax.random.randint(k, (), 0, x.shape[0])
        value, grads = jax.value_and_grad(loss)(params, x[j][None], y[j][None])
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), value
    return jax.lax.scan(step, params, jax.random.split(key, steps))


def per_example_grads(loss: Callable, params: Any, x: jax.Array, y: jax.Array,
                      clip_norm: float | None = None) -> tuple[Any, jax.Array]:
    """Per-example gradients (``jax.vmap`` of ``jax.grad``) of ``loss(params, x[None], y[None])``.

    With ``clip_norm``, each example's gradient is scaled to global norm ≤ ``clip_norm`` (as in
    differentially-private SGD). Returns the per-example gradients (a leading batch axis on
    every leaf) and their norms before clipping.
    """
    grads = jax.vmap(jax.grad(lambda p, xi, yi: loss(p, xi[None], yi[None])), (None, 0, 0))(params, x, y)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree.leaves(grads)))
    if clip_norm is not None:
        scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))
        grads = jax.tree.map(lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)), grads)
    return grads, norms


def evaluate(apply: Callable, params: Any, x: jax.Array, y: jax.Array, task: str,
             backward: str = "manual") -> tuple[jax.Array, jax.Array]:
    """Mean loss and accuracy (classification), root-mean-square error (regression) or
    exact-sequence accuracy (sequence: every position with a target right)."""
    out = jax.vmap(lambda xi: apply(params, xi))(x)
    loss = make_loss(lambda p, xi: apply(p, xi), task, backward)(params, x, y)
    if task == "classification":
        return loss, jnp.mean(jnp.argmax(out, -1) == y)
    if task == "sequence":
        right = (jnp.argmax(out, -1) == y) | (y < 0)
        return loss, jnp.mean(jnp.all(right, axis=-1))
    return loss, jnp.sqrt(jnp.mean((out - y) ** 2))

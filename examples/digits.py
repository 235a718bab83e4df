"""Handwritten digits with an MLP and with ResNet-S, through the library API (no CLI, no trainer).

The pieces behind ``jbackprop train``, used directly: ``jbackprop.train.data.digits()`` (scikit-learn's
8×8 digits, a fixed stratified split, standardised), ``make_model`` / ``make_loss`` /
``make_optimizer`` from a ``Config`` (AdamW, cosine decay, Gaussian input noise 0.6),
``train_epoch`` (Algorithm 2, one ``lax.scan`` of steps) under ``jax.jit`` in a loop, and
``evaluate``. Then per-example gradients of one batch, clipped as in DP-SGD.

The default here is 30 epochs per model (a short run; each reaches ≥ 95 % test accuracy).
``jbackprop train`` with its defaults (100 epochs) reaches ≥ 97.5 %; see docs/training.md.

    python examples/digits.py
    python examples/digits.py --epochs 100
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop import train
from jbackprop.train import data
from jbackprop.train import Config, TrainState

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--epochs", type=int, default=30, help="epochs per model (default 30)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

ds = data.digits()
x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
x_test, y_test = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
print(f"digits: {len(x)} training and {len(x_test)} test images of {ds.x_train.shape[1]} pixels, "
      f"{ds.num_outputs} classes")

trained = {}
for model in ("mlp", "resnet-s"):
    cfg = Config(model=model, epochs=args.epochs, seed=args.seed)   # width 256, depth 3, AdamW 1e-3
    init, apply = train.make_model(cfg, ds.x_train.shape[1:], ds.num_outputs)
    loss = train.make_loss(apply, ds.task, cfg.backward)           # mean cross-entropy
    steps_per_epoch = len(x) // cfg.batch_size
    opt = train.make_optimizer(cfg, cfg.epochs * steps_per_epoch)

    # One epoch = one jit-compiled lax.scan over the mini-batches: forward, jax.grad running the
    # hand-written backwards, optax update.
    epoch = jax.jit(lambda s, k: train.train_epoch(loss, opt, s, x, y, k, cfg.batch_size,
                                                   cfg.input_noise))
    evaluate = jax.jit(lambda p, xs, ys: train.evaluate(apply, p, xs, ys, ds.task))

    start = time.perf_counter()
    k_init, key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    params = init(k_init)
    state = TrainState(params, opt.init(params), jnp.zeros((), jnp.int32))
    for e in range(cfg.epochs):
        state, step_losses = epoch(state, jax.random.fold_in(key, e))
    train_loss, train_acc = evaluate(state.params, x, y)
    test_loss, test_acc = evaluate(state.params, x_test, y_test)
    print(f"{model:9s} {cfg.epochs} epochs ({cfg.epochs * steps_per_epoch} steps): train loss "
          f"{float(train_loss):.4f}, train accuracy {100 * float(train_acc):.2f} %, test accuracy "
          f"{100 * float(test_acc):.2f} %, {time.perf_counter() - start:.1f} s")
    assert float(test_acc) >= 0.95, f"{model}: test accuracy {float(test_acc):.4f} < 0.95"
    trained[model] = (loss, state.params)

# --- per-example gradients of one batch, and clipping (DP-SGD) ------------------------------------
loss, params = trained["mlp"]
xb, yb = x[:32], y[:32]
grads, norms = train.per_example_grads(loss, params, xb, yb)          # jax.vmap of jax.grad
batch_grad = jax.grad(loss)(params, xb, yb)                           # gradient of the batch mean
mean_grad = jax.tree.map(lambda g: g.mean(0), grads)
for g, h in zip(jax.tree.leaves(mean_grad), jax.tree.leaves(batch_grad)):
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(h))))
print(f"\nper-example gradients of a batch of {len(xb)}: their mean equals jax.grad of the batch "
      f"loss; norms {float(norms.min()):.3g} … {float(norms.max()):.3g}")

C, sigma = float(jnp.median(norms)), 1.0                               # clip at the median norm
clipped, _ = train.per_example_grads(loss, params, xb, yb, clip_norm=C)
clipped_norms = jnp.sqrt(sum(jnp.sum(g.reshape(len(xb), -1) ** 2, 1) for g in jax.tree.leaves(clipped)))
assert float(clipped_norms.max()) <= C * (1 + 1e-5)
leaves, treedef = jax.tree.flatten(clipped)
keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
dp_grad = treedef.unflatten([(g.sum(0) + sigma * C * jax.random.normal(k, g.shape[1:])) / len(xb)
                             for g, k in zip(leaves, keys)])           # DP-SGD: clip, sum, noise
print(f"clipped at C = {C:.3g}: {int(jnp.sum(norms > C))} of {len(xb)} gradients scaled down, all "
      f"norms now ≤ C; one DP-SGD gradient (noise σC, σ = {sigma}) has norm "
      f"{float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(dp_grad)))):.3g}")

"""XOR, which no linear model represents: a two-layer network designed by hand, then one learned.

(a) The MLP lecture's hand-designed network (its Figure 2 uses binary thresholds at 0): hidden
    unit h1 detects "at least one input is 1", h2 detects "both are 1", and the output fires
    when h1 and not h2. With ReLU in place of the thresholds the same idea is exact:
        h1 = relu(x1 + x2),  h2 = relu(x1 + x2 − 1),  y = h1 − 2 h2,
    computed here by ``jb.mlp``; the threshold version is written out in NumPy beside it.
(b) The same kind of network learned from data: ``jbackprop.train.data.xor()`` (the four points,
    repeated), an MLP 2 → 32 → 2 with cross-entropy, AdamW, Algorithm 2 (``train_epoch``, jit),
    trained from 20 random initialisations; every one classifies the four points correctly.

    python examples/xor.py
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

import jbackprop as jb
from jbackprop import train
from jbackprop.train import data
from jbackprop.train import Config, TrainState

X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
XOR = np.array([0, 1, 1, 0])

# --- (a) designed by hand -------------------------------------------------------------------
# jb.mlp: a[1] = relu(W1 x + b1), y = W2 a[1] + b2 (the last layer is linear).
relu_net = [{"W": jnp.array([[1.0, 1.0],            # h1 = relu(x1 + x2)      "at least one"
                             [1.0, 1.0]]),          # h2 = relu(x1 + x2 − 1)  "both"
             "b": jnp.array([0.0, -1.0])},
            {"W": jnp.array([[1.0, -2.0]]),          # y  = h1 − 2 h2
             "b": jnp.array([0.0])}]
y_relu = np.asarray(jax.vmap(lambda x: jb.mlp(relu_net, x))(jnp.asarray(X))[:, 0])


def threshold(z):                                   # binary threshold at 0 (Figure 2)
    return (z > 0).astype(np.float32)


# The threshold network: the same two detectors and "h1 and not h2" (one choice of weights).
h = threshold(X @ np.array([[1.0, 1.0], [1.0, 1.0]]) + np.array([-0.5, -1.5]))
y_thresh = threshold(h @ np.array([1.0, -1.0]) - 0.5)

# The best linear model, least squares with a bias: 0.5 at every point, XOR out of reach.
A = np.c_[X, np.ones(4)]
y_linear = A @ np.linalg.lstsq(A, XOR.astype(np.float64), rcond=None)[0]

print("x1 x2 | XOR | ReLU net (jb.mlp) | threshold net | best linear fit")
for x, t, r, s, lin in zip(X, XOR, y_relu, y_thresh, y_linear):
    print(f" {x[0]:.0f}  {x[1]:.0f} |  {t}  | {r:17.1f} | {s:13.0f} | {lin:15.2f}")
assert np.array_equal(y_relu, XOR), y_relu           # exact, not just rounded
assert np.array_equal(y_thresh, XOR), y_thresh
assert np.allclose(y_linear, 0.5)

# --- (b) learned from data ------------------------------------------------------------------
ds = data.xor()                                       # 4 points × 64 copies; test = the 4 points
x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
sizes, seeds = [2, 32, 2], range(20)
cfg = Config(dataset="xor", lr=1e-2, batch_size=32, epochs=50, input_noise=0.0)
steps_per_epoch = len(x) // cfg.batch_size
loss = train.make_loss(jb.mlp, ds.task, "manual")     # mean cross-entropy, hand-written backward
opt = train.make_optimizer(cfg, cfg.epochs * steps_per_epoch)   # AdamW, cosine decay
epoch = jax.jit(lambda s, k: train.train_epoch(loss, opt, s, x, y, k, cfg.batch_size))
evaluate = jax.jit(lambda p: train.evaluate(jb.mlp, p, jnp.asarray(ds.x_test),
                                            jnp.asarray(ds.y_test), ds.task))

start, results = time.perf_counter(), []
for seed in seeds:
    k_init, key = jax.random.split(jax.random.PRNGKey(seed))
    params = jb.mlp_init(k_init, sizes)
    state = TrainState(params, opt.init(params), jnp.zeros((), jnp.int32))
    for e in range(cfg.epochs):
        state, _ = epoch(state, jax.random.fold_in(key, e))
    test_loss, acc = evaluate(state.params)
    results.append((seed, float(test_loss), float(acc), state.params))

seed, test_loss, acc, params = results[0]
p = np.asarray(jax.nn.softmax(jax.vmap(lambda xi: jb.mlp(params, xi))(jnp.asarray(X)), -1))
print(f"\nlearned: MLP {sizes}, AdamW lr {cfg.lr} with cosine decay, batch {cfg.batch_size}, "
      f"{cfg.epochs} epochs ({cfg.epochs * steps_per_epoch} steps)")
print("x1 x2 | XOR | P(y = 1), seed 0")
for xi, t, pi in zip(X, XOR, p[:, 1]):
    print(f" {xi[0]:.0f}  {xi[1]:.0f} |  {t}  | {pi:.4f}")
accs = [r[2] for r in results]
print(f"{len(results)} seeds: test accuracy {100 * min(accs):.0f} % for every one, mean "
      f"cross-entropy ≤ {max(r[1] for r in results):.4f}; {time.perf_counter() - start:.1f} s")
bad = [r[0] for r in results if r[2] < 1.0]
assert not bad, f"seeds {bad} did not learn XOR"

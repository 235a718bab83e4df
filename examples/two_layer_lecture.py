"""The backprop lecture's two-layer network, in jbackprop, side by side with its 20 lines of NumPy.

The lecture's network: a sigmoid hidden layer, no biases, the squared error summed over the
batch, plain gradient descent with step 1e-4, N, D_in, H, D_out = 64, 1000, 100, 10, 2000 steps.
Here the same network is written with jbackprop's modules (``jb.mm`` without a bias,
``jb.sigmoid``, ``jb.mse_loss`` × 2 = the sum of squares), ``jax.grad`` runs their hand-written
backward functions, and the update is one jit-compiled step. Both loops start from the same
weights, in float64, and the script asserts at every step that the losses and the weights agree
to round-off (rtol 1e-9).

    python examples/two_layer_lecture.py              # the full lecture run: 2000 steps
    python examples/two_layer_lecture.py --steps 200
"""
import argparse
import os
import time

# The NumPy loop's matrices are small: one BLAS thread. Otherwise OpenBLAS's worker threads,
# spinning between the NumPy steps, fight XLA's for the cores and the run takes 10× longer.
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import jax

jax.config.update("jax_enable_x64", True)          # float64, as NumPy computes

import jax.numpy as jnp
import numpy as np

import jbackprop as jb

RTOL = 1e-9

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--steps", type=int, default=2000, help="gradient steps (default 2000, the lecture's)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

# --- the lecture's data and initial weights (randn, as on the slide) --------------------------
rng = np.random.default_rng(args.seed)
N, D_in, H, D_out = 64, 1000, 100, 10
x, y = rng.standard_normal((N, D_in)), rng.standard_normal((N, D_out))
w1, w2 = rng.standard_normal((D_in, H)), rng.standard_normal((H, D_out))


# --- the same network in jbackprop: one example per call (the notes' W is (out, in)), -------
# --- extra leading axes batch it; no biases ----------------------------------------------------
def loss(params, x, y):
    h = jb.sigmoid(jb.mm({"W": params["W1"]}, x))          # h = σ(W1 x)
    y_pred = jb.mm({"W": params["W2"]}, h)                 # y_pred = W2 h
    return 2 * jnp.sum(jb.mse_loss(y_pred, y))             # ½‖·‖² per example: ×2 = Σ squares


@jax.jit
def step(params, x, y):
    value, grads = jax.value_and_grad(loss)(params, x, y)  # the hand-written backwards
    return jax.tree.map(lambda p, g: p - 1e-4 * g, params, grads), value


params = {"W1": jnp.asarray(w1.T), "W2": jnp.asarray(w2.T)}   # the same initial weights
xj, yj = jnp.asarray(x), jnp.asarray(y)


def check(name, got, want, t):
    got = np.asarray(got)
    err = np.max(np.abs(got - want) / (np.abs(want) + np.max(np.abs(want))))
    if not err <= RTOL:
        raise AssertionError(f"step {t}: {name} differs from the NumPy loop: max relative "
                             f"error {err:.3g} > {RTOL:g}")
    return err


start, worst = time.perf_counter(), 0.0
print(f"{'step':>5} {'NumPy loss':>18} {'jbackprop loss':>18}")
for t in range(args.steps):
    # ---- the lecture's NumPy loop, line for line ----
    h = 1 / (1 + np.exp(-x.dot(w1)))
    y_pred = h.dot(w2)
    loss_np = np.square(y_pred - y).sum()

    grad_y_pred = 2.0 * (y_pred - y)
    grad_w2 = h.T.dot(grad_y_pred)
    grad_h = grad_y_pred.dot(w2.T)
    grad_w1 = x.T.dot(grad_h * h * (1 - h))

    w1 -= 1e-4 * grad_w1
    w2 -= 1e-4 * grad_w2

    # ---- jbackprop: one jit-compiled step ----
    params, loss_jb = step(params, xj, yj)

    worst = max(worst, check("loss", loss_jb, loss_np, t),
                check("W1", params["W1"], w1.T, t), check("W2", params["W2"], w2.T, t))
    if t % 200 == 0 or t == args.steps - 1:
        print(f"{t:5d} {loss_np:18.10f} {float(loss_jb):18.10f}")

print(f"{args.steps} steps: losses and weights agree at every step (worst relative error "
      f"{worst:.2g}, tolerance {RTOL:g}); {time.perf_counter() - start:.1f} s")

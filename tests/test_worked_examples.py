"""The worked examples of the course material (the lecture slides and the backprop lecture).

The ReLU slide example is in test_activations.py, the matrix-multiply slide in test_linear.py
and the regularised single unit in test_losses.py.
"""
import jax
import jax.numpy as jnp
import numpy as np

import jbackprop as jb
from helpers import assert_close


def test_circuit_x_plus_y_times_z():
    """f(x, y, z) = (x + y) z at (−2, 5, −4): f = −12, ∂f/∂x = ∂f/∂y = −4, ∂f/∂z = 3.
    Written as two MMs and back-propagated with their hand-written backwards only:
    add distributes (Wᵀv with W = [1 1]), mul switches (B[MM, W] is the other factor)."""
    xy, z = jnp.array([-2.0, 5.0]), jnp.array([-4.0])
    add = {"W": jnp.array([[1.0, 1.0]])}
    q, add_back = jb.mm.vjp(add, xy)                 # q = x + y = 3
    f, mul_back = jb.mm.vjp({"W": q[:, None]}, z)    # f = q z = −12
    assert float(f[0]) == -12.0
    mul_bar, z_bar = mul_back(jnp.array([1.0]))
    _, xy_bar = add_back(mul_bar["W"][:, 0])         # ∂f/∂q = z = −4, distributed to x and y
    np.testing.assert_array_equal(xy_bar, [-4.0, -4.0])
    np.testing.assert_array_equal(z_bar, [3.0])


def test_two_layer_network_matches_the_lecture_numpy_loop():
    """The backprop lecture's 20-line NumPy network (sigmoid hidden layer, no biases, summed
    squared error, step 1e-4), from the same initial weights: jbackprop reproduces it step
    for step (fewer steps and a smaller D_in here; examples/ runs the full 2000 steps)."""
    rng = np.random.default_rng(0)
    N, D_in, H, D_out = 64, 100, 20, 10
    x, y = rng.standard_normal((N, D_in)), rng.standard_normal((N, D_out))
    w1, w2 = rng.standard_normal((D_in, H)), rng.standard_normal((H, D_out))

    def loss(params, x, y):  # notes convention: W (out, in); rows of x are examples
        h = jb.sigmoid(jb.mm({"W": params["W1"]}, x))
        y_pred = jb.mm({"W": params["W2"]}, h)
        return 2 * jnp.sum(jb.mse_loss(y_pred, y))   # ½‖·‖² per example, so ×2 = Σ squares

    step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 1e-4 * g, p, jax.grad(loss)(p, x, y)))
    params = {"W1": jnp.asarray(w1.T), "W2": jnp.asarray(w2.T)}
    for t in range(20):
        h = 1 / (1 + np.exp(-x.dot(w1)))
        y_pred = h.dot(w2)
        np.testing.assert_allclose(float(loss(params, x, y)), np.square(y_pred - y).sum(), rtol=1e-12)
        grad_y_pred = 2.0 * (y_pred - y)
        grad_w2 = h.T.dot(grad_y_pred)
        grad_h = grad_y_pred.dot(w2.T)
        grad_w1 = x.T.dot(grad_h * h * (1 - h))
        w1 -= 1e-4 * grad_w1
        w2 -= 1e-4 * grad_w2
        params = step(params)
        assert_close(params["W1"], w1.T, 1e-10, f"W1 at step {t}")
        assert_close(params["W2"], w2.T, 1e-10, f"W2 at step {t}")


def test_xor_by_hand_designed_relu_network():
    """XOR, which no linear model represents, by a two-layer ReLU network with hand-set weights:
    h1 = x1 + x2 ("at least one"), h2 = relu(x1 + x2 − 1) ("both"), y = h1 − 2 h2."""
    params = [{"W": jnp.array([[1.0, 1.0], [1.0, 1.0]]), "b": jnp.array([0.0, -1.0])},
              {"W": jnp.array([[1.0, -2.0]]), "b": jnp.array([0.0])}]
    X = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    out = jax.vmap(lambda x: jb.mlp(params, x))(X)[:, 0]
    np.testing.assert_array_equal(out, [0.0, 1.0, 1.0, 0.0])


def test_linear_network_collapses_to_one_matrix():
    """W[2] W[1] x = W̃ x: without activations, depth adds nothing, forward or backward."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    W1, W2 = jax.random.normal(k1, (5, 3)), jax.random.normal(k2, (2, 5))
    x, v = jax.random.normal(k3, (3,)), jnp.array([1.0, -2.0])
    deep = lambda x: jb.mm({"W": W2}, jb.mm({"W": W1}, x))
    assert_close(deep(x), (W2 @ W1) @ x, 1e-12)
    assert_close(jax.vjp(deep, x)[1](v)[0], (W2 @ W1).T @ v, 1e-12)

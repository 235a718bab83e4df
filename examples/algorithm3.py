"""Algorithm 3 of the notes written out by hand: an MLP's gradient from the modules' own
backward functions, layer by layer, with no jax.grad — then checked against jax.grad.

    python examples/algorithm3.py
"""
import jax, jax.numpy as jnp
import jbackprop as jb

params = jb.mlp_init(jax.random.PRNGKey(0), [5, 16, 8, 3])      # d = 5, m1 = 16, m2 = 8, k = 3
x, y = jax.random.normal(jax.random.PRNGKey(1), (5,)), 2

# 1. Forward pass: each module returns its output and a pullback holding its residuals.
a, pullbacks = x, []
for p in params[:-1]:
    z, mm_back = jb.mm.vjp(p, a)            # z[k] = W[k] a[k-1] + b[k]
    a, relu_back = jb.relu.vjp(z)           # a[k] = σ(z[k])
    pullbacks.append((mm_back, relu_back))
t, head_back = jb.mm.vjp(params[-1], a)     # z[r]: the last layer is linear
J, loss_back = jb.cross_entropy_loss.vjp(t, y)

# 2. Backward pass: ∂J/∂z[r] = B[ℓ, z[r]](1), then layer by layer.
t_bar, _ = loss_back(jnp.ones_like(J))      # the integer label's cotangent is None
head_bar, a_bar = head_back(t_bar)          # ∂J/∂W[r] = ∂J/∂z[r] a[r-1]ᵀ, ∂J/∂a[r-1] = W[r]ᵀ ∂J/∂z[r]
grads = [head_bar]
for mm_back, relu_back in reversed(pullbacks):
    (z_bar,) = relu_back(a_bar)             # ∂J/∂z[k] = σ'(z[k]) ⊙ ∂J/∂a[k]
    p_bar, a_bar = mm_back(z_bar)           # ∂J/∂W[k], ∂J/∂b[k], ∂J/∂a[k-1]
    grads.insert(0, p_bar)

# 3. The same gradient from jax.grad: through jb.mlp (it chains the same hand-written
#    backwards), and of the pure-jnp reference (JAX's own autodiff, independent).
for f in (lambda ps: jb.cross_entropy_loss(jb.mlp(ps, x), y),
          lambda ps: jb.reference.cross_entropy_loss(jb.reference.mlp(ps, x), y)):
    ok = jax.tree.map(lambda g, h: jnp.allclose(g, h, atol=1e-6), grads, jax.grad(f)(params))
    assert all(jax.tree.leaves(ok))
print("Algorithm 3 by hand == jax.grad, J =", float(J))

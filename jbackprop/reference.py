"""Pure ``jax.numpy`` references: the same mathematics with no custom rule at all.

These are what the hand-written backwards are checked against (``jax.grad`` of these), and what
``backward="autodiff"`` trains and benchmarks with. They are written plainly from the course notes, with
no shared code with the modules, and are not meant to be fast. One example at a time, in the
notes' convention; batch them with ``jax.vmap``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def mm(params, z):
    u = params["W"] @ z
    return u + params["b"] if "b" in params else u


def relu(z):
    return jnp.where(z > 0, z, 0.0)


def sigmoid(z):
    return 1 / (1 + jnp.exp(-z))


def tanh(z):
    return (jnp.exp(z) - jnp.exp(-z)) / (jnp.exp(z) + jnp.exp(-z))


def leaky_relu(z, gamma=0.01):
    return jnp.where(z > 0, z, gamma * z)


def gelu(z, approximate=False):
    if approximate:
        return z / 2 * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    return z / 2 * (1 + jax.scipy.special.erf(z / math.sqrt(2)))


def softplus(z, beta=1.0):
    return jnp.log1p(jnp.exp(beta * z)) / beta


def elu(z, alpha=1.0):
    return jnp.where(z >= 0, z, alpha * (jnp.exp(z) - 1))


def layer_norm_s(z, eps=1e-5):
    mu = jnp.mean(z, axis=-1, keepdims=True)
    sigma = jnp.sqrt(jnp.mean((z - mu) ** 2, axis=-1, keepdims=True) + eps)
    return (z - mu) / sigma


def layer_norm(params, z, eps=1e-5):
    return params["beta"] + params["gamma"] * layer_norm_s(z, eps)


def batch_norm(params, z, eps=1e-5, axis_name=None):
    """β + γ (z − μ)/sqrt(σ² + ε), μ and σ² over all axes but the last (and ``axis_name``)."""
    def mean(a):
        m = jnp.mean(a, axis=tuple(range(a.ndim - 1)))
        return m if axis_name is None else jax.lax.pmean(m, axis_name)
    mu = mean(z)
    return params["beta"] + params["gamma"] * (z - mu) / jnp.sqrt(mean((z - mu) ** 2) + eps)


def rms_norm(params, z, eps=1e-6):
    """γ z / sqrt(mean(z²) + ε) over the last axis."""
    return params["gamma"] * z / jnp.sqrt(jnp.mean(z ** 2, axis=-1, keepdims=True) + eps)

def conv1d_s(params, z):
    """Σ_j w_j z_{i−ℓ+(j−1)} + b with zero padding (7.48), by explicit shifted slices."""
    w = params["w"]
    k = w.shape[0]
    ell = k // 2
    zp = jnp.pad(z, (ell, ell))
    m = z.shape[0]
    return sum(w[j] * zp[j:j + m] for j in range(k)) + params["b"]


def conv1d(params, z):
    """z (m, C), w (k, C, C'): out_i,c' = Σ_j Σ_c w_{j,c,c'} z_{i−ℓ+j, c} + b_c'."""
    w = params["w"]
    k = w.shape[0]
    ell = k // 2
    m = z.shape[0]
    zp = jnp.pad(z, ((ell, ell), (0, 0)))
    return sum(zp[j:j + m] @ w[j] for j in range(k)) + params["b"]


def conv2d_s(params, z):
    w = params["w"]
    k = w.shape[0]
    ell = k // 2
    h, wd = z.shape
    zp = jnp.pad(z, ell)
    return sum(w[a, c] * zp[a:a + h, c:c + wd] for a in range(k) for c in range(k)) + params["b"]


def conv2d(params, z):
    w = params["w"]
    k = w.shape[0]
    ell = k // 2
    h, wd, _ = z.shape
    zp = jnp.pad(z, ((ell, ell), (ell, ell), (0, 0)))
    return sum(zp[a:a + h, c:c + wd] @ w[a, c] for a in range(k) for c in range(k)) + params["b"]


def mse_loss(t, y):
    return 0.5 * jnp.sum((t - y) ** 2)


def logistic_loss(t, y):
    """−log p(y | t) with p(y = 1 | t) = 1/(1 + e^{−t}), written stably."""
    return jnp.logaddexp(0.0, t) - y * t


def cross_entropy_loss(t, y):
    """−log softmax(t)_y = logsumexp(t) − t_y."""
    c = jnp.max(t)
    return c + jnp.log(jnp.sum(jnp.exp(t - c))) - t[y]


def linear_cross_entropy(params, z, y, chunk_size=None):
    """``cross_entropy_loss(mm(params, z), y)`` on every row of ``z``, the full logits at once."""
    t = z @ params["W"].T + params["b"] if "b" in params else z @ params["W"].T
    c = jnp.max(t, axis=-1, keepdims=True)
    lse = c[..., 0] + jnp.log(jnp.sum(jnp.exp(t - c), axis=-1))
    return lse - jnp.take_along_axis(t, y[..., None], axis=-1)[..., 0]


def residual(params, z, activation=relu):
    return z + activation(mm(params["mm2"], activation(mm(params["mm1"], z))))


def mlp(params, x, activation=relu):
    for p in params[:-1]:
        x = activation(mm(p, x))
    return mm(params[-1], x)


def resnet_s(params, x, activation=relu):
    z = mm(params["proj"], x) if "proj" in params else x
    blocks = params["blocks"]
    for i in range(blocks["mm1"]["W"].shape[0]):
        z = residual(jax.tree.map(lambda a: a[i], blocks), z, activation)
    return mm(params["head"], z)


def softmax(z):
    """e^z / Σ e^z over the last axis (shifted by the max, which does not change it)."""
    e = jnp.exp(z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True)))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def attention(q, k, v, causal=False, block_size=None):
    """softmax(q kᵀ/√d) v, holding the whole (n, m) matrix (``block_size`` is ignored)."""
    del block_size
    s = q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(q.shape[-1])
    if causal:
        s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
    return softmax(s) @ v


def multi_head_attention(params, x, num_heads, causal=False):
    n, d = x.shape
    width = d // num_heads

    def heads(name):                                   # (n, d) -> (num_heads, n, width)
        u = x @ params[name]["W"].T + params[name].get("b", 0.0)
        return u.reshape(n, num_heads, width).transpose(1, 0, 2)
    o = attention(heads("q"), heads("k"), heads("v"), causal)
    return o.transpose(1, 0, 2).reshape(n, d) @ params["o"]["W"].T + params["o"]["b"]


def _pool1d(reduce, z, window, stride):
    """Windows of ``window`` rows every ``stride`` rows of z (..., m, C), each reduced."""
    stride = window if stride is None else stride
    count = (z.shape[-2] - window) // stride + 1
    return jnp.stack([reduce(z[..., i * stride:i * stride + window, :], axis=-2)
                      for i in range(count)], axis=-2)


def _pool2d(reduce, z, window, stride):
    """Windows (a, b) every (sa, sb) of z (..., h, w, C), each reduced over both axes."""
    a, b = (window, window) if isinstance(window, int) else window
    stride = (a, b) if stride is None else stride
    sa, sb = (stride, stride) if isinstance(stride, int) else stride
    rows, cols = (z.shape[-3] - a) // sa + 1, (z.shape[-2] - b) // sb + 1
    return jnp.stack([jnp.stack([reduce(z[..., i * sa:i * sa + a, j * sb:j * sb + b, :],
                                        axis=(-3, -2)) for j in range(cols)], axis=-2)
                      for i in range(rows)], axis=-3)


def max_pool1d(z, window, stride=None):
    return _pool1d(jnp.max, z, window, stride)


def avg_pool1d(z, window, stride=None):
    return _pool1d(jnp.mean, z, window, stride)


def max_pool2d(z, window, stride=None):
    return _pool2d(jnp.max, z, window, stride)


def avg_pool2d(z, window, stride=None):
    return _pool2d(jnp.mean, z, window, stride)


def dropout(z, key, rate):
    """Inverted dropout: keep with probability 1 − rate, scale the kept by 1/(1 − rate)."""
    keep = jax.random.bernoulli(key, 1 - rate, z.shape)
    return jnp.where(keep, z / (1 - rate), 0.0)


def embedding(params, ids):
    return params["E"][ids]


def transformer(params, ids, causal=True):
    """Token + position embeddings, pre-LN blocks (a Python loop), final LN, head."""
    num_heads = params["heads"].shape[0]
    n = ids.shape[0]
    x = embedding(params["embed"], ids) + params["pos"]["E"][:n]
    blocks = params["blocks"]
    for i in range(blocks["mlp1"]["W"].shape[0]):
        p = jax.tree.map(lambda a: a[i], blocks)
        x = x + multi_head_attention(p["attn"], layer_norm(p["ln1"], x), num_heads, causal)
        h = gelu(layer_norm(p["ln2"], x) @ p["mlp1"]["W"].T + p["mlp1"]["b"])
        x = x + h @ p["mlp2"]["W"].T + p["mlp2"]["b"]
    return layer_norm(params["final"], x) @ params["head"]["W"].T + params["head"]["b"]

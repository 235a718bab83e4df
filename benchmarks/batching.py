"""Quick benchmark of the batching design: a vmapped per-example MLP with hand-written
backwards against ``jax.grad`` of the same MLP written on a batch, and against a plain
``custom_vjp`` MM without the batching dispatch (the design we rejected).

Each variant is one jit-compiled gradient of the mean cross-entropy; runs are interleaved
(manual, autodiff, plain, manual, …) after warm-up and the medians are reported.

    python benchmarks/batching.py [--repeats 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import jbackprop as jb


@jax.custom_vjp
def _plain_mm(W, b, z):          # per-example MM whose backward is jnp.outer(v, z)
    return W @ z + b


_plain_mm.defvjp(lambda W, b, z: (W @ z + b, (W, z)),
                 lambda res, v: (jnp.outer(v, res[1]), v, res[0].T @ v))


def losses():
    def per_example(mm):
        def loss(params, X, Y):
            def f(x):
                for p in params[:-1]:
                    x = jb.relu(mm(p, x))
                return mm(params[-1], x)
            return jnp.mean(jax.vmap(jb.cross_entropy_loss)(jax.vmap(f)(X), Y))
        return loss

    def autodiff(params, X, Y):  # the same model on a batch, differentiated by jax.grad
        for p in params[:-1]:
            X = jax.nn.relu(X @ p["W"].T + p["b"])
        logits = X @ params[-1]["W"].T + params[-1]["b"]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, Y[:, None], 1)[:, 0])

    return {"jbackprop vmap": per_example(jb.mm), "jax.grad batched": autodiff,
            "plain custom_vjp vmap": per_example(lambda p, z: _plain_mm(p["W"], p["b"], z))}


def run(sizes, batch, repeats):
    params = jb.mlp_init(jax.random.PRNGKey(0), sizes)
    X = jax.random.normal(jax.random.PRNGKey(1), (batch, sizes[0]))
    Y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, sizes[-1])
    fns = {k: jax.jit(jax.grad(f)) for k, f in losses().items()}
    grads = {k: f(params, X, Y) for k, f in fns.items()}
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(grads["jbackprop vmap"]), jax.tree.leaves(grads["jax.grad batched"])))
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(params, X, Y))
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    base = med["jax.grad batched"]
    print(f"MLP {'→'.join(map(str, sizes))}, batch {batch} (max |Δgrad| vs autodiff {err:.1e})")
    for k, v in med.items():
        print(f"  {k:24s} {v:8.2f} ms   ratio to jax.grad {v / base:.2f}")
    return med


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    run([784, 1024, 1024, 1024, 1024, 10], 256, args.repeats)
    run([784, 256, 256, 10], 64, args.repeats * 4)


if __name__ == "__main__":
    main()

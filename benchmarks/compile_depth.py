"""ResNet-S compile time against depth (issue 2: depth 512 within 1.5× of depth 8).

Compiles ``jax.jit(jax.grad(loss))`` of a vmapped ResNet-S for each depth (fresh function
each time, so nothing is cached) and reports the median of a few compilations.

    python benchmarks/compile_depth.py [--depths 8 64 512 1024]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import jbackprop as jb


def compile_seconds(depth, width=64, batch=32):
    params = jb.resnet_s_init(jax.random.PRNGKey(0), 16, width, depth, 10)
    X = jnp.ones((batch, 16))
    Y = jnp.zeros((batch,), jnp.int32)

    def loss(p, X, Y):  # a new function object: no compilation cache hit
        return jnp.mean(jax.vmap(lambda x, y: jb.cross_entropy_loss(jb.resnet_s(p, x), y))(X, Y))
    t = time.perf_counter()
    jax.jit(jax.grad(loss)).lower(params, X, Y).compile()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[8, 64, 512, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    compile_seconds(2)  # warm up JAX itself
    res = {d: statistics.median(compile_seconds(d) for _ in range(args.repeats)) for d in args.depths}
    base = res[args.depths[0]]
    for d, s in res.items():
        print(f"depth {d:5d}: trace+compile {s:.2f} s  ({s / base:.2f}× depth {args.depths[0]})")


if __name__ == "__main__":
    main()

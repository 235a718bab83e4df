"""ResNet-S compile time against depth: ``jit(grad)`` of a vmapped ResNet-S, traced and compiled
afresh at each depth (the blocks run in ``lax.scan``, so the time should not grow with depth).

    python benchmarks/compile_depth.py [--depths 8 64 512 1024]
"""
from __future__ import annotations

import argparse

from jbackprop.bench import compile_vs_depth


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[8, 64, 512, 1024])
    args = ap.parse_args()
    res = compile_vs_depth(args.depths)
    base = res[args.depths[0]]
    for d, s in res.items():
        print(f"depth {d:5d}: trace+compile {s:.2f} s  ({s / base:.2f}× depth {args.depths[0]})")


if __name__ == "__main__":
    main()

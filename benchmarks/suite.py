"""The benchmark suite, as a script: the same as ``jbackprop bench`` (same options).

    python benchmarks/suite.py [--config mlp-large ...] [--quick] [--json bench.json] [--plot PNG]

Each configuration is timed as a whole jit-compiled training step (forward, hand-written or
autodiff backward, optax Adam update), the versions interleaved, medians reported, with compile
time, temporary memory from ``memory_analysis()``, forward-only and forward+backward times, a
GEMM probe and the targets. See ``docs/benchmarks.md`` for the measured tables.
"""
import sys

from jbackprop.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

"""``jbackprop bench``: whole training steps with the hand-written backwards against ``jax.grad``
of the same mathematics.

* ``harness``: timing (interleaved medians), compile time, ``memory_analysis()``, the GEMM probe,
  the run and its targets;
* ``models``: the benchmark configurations, each built twice from the same per-example code;
* ``external``: the PyTorch and Equinox columns, when those are installed;
* ``report``: the table, Markdown and chart.
"""
from jbackprop.bench.harness import compile_vs_depth, main, run

__all__ = ["run", "main", "compile_vs_depth"]

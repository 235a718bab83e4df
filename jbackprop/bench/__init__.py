"""``jbackprop bench``: whole training steps with the hand-written backwards against ``jax.grad``
of the same model as a user would write it (``lax.conv_general_dilated`` for the convolutions,
plain ``jnp`` otherwise).

* ``harness``: timing (interleaved medians), compile time, ``memory_analysis()``, the GEMM probe,
  the run and its targets;
* ``models``: the benchmark configurations, each built from the same per-example code with
  jbackprop and with the references, and the ``lax.conv`` baseline of the convolutional nets;
* ``external``: the PyTorch, Equinox and Flax columns, when those are installed;
* ``forward``: the forward-mode section, ``jax.jvp`` and Hessian-vector products with the
  hand-written JVP rules against autodiff of the reference;
* ``report``: the table, Markdown and chart.
"""
from jbackprop.bench.harness import compile_vs_depth, main, run

__all__ = ["run", "main", "compile_vs_depth"]

import os
import tempfile

# Compile each distinct XLA program once per machine: the test files compile many identical
# programs (the same module's rules and references, from several tests and both xdist
# workers), and JAX's persistent compilation cache keys on the program, the JAX version and
# the backend, so a hit is the very executable a miss would build (about 13 % of the suite's
# time on 2 cores). Set before JAX starts; subprocesses (examples, CLI) inherit it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "jbackprop-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

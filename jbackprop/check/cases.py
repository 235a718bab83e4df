"""The cases ``jbackprop check`` runs, from the module registry: every module and model at every
declared example shape and hyper-parameter setting, with its pure-jnp reference. The test-suite
runs the same cases (``tests/test_registry.py``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jbackprop.check.engine import verify_vjp
from jbackprop.check.forward import verify_jvp
from jbackprop.check.report import Report
from jbackprop.modules import registry


def library_cases(seed: int = 0) -> list[registry.Case]:
    """``Case(name, fn, reference, args, options, declaration)`` for every module and model."""
    return registry.cases(seed)


def cast_case(args, dtype):
    """The example arguments (float64 NumPy) as JAX arrays, floats in ``dtype``."""
    return jax.tree.map(lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
                        else jnp.asarray(a), args)


def _run(index: int, dtypes: tuple[str, ...]) -> list[Report]:
    """Both modes of one case: ``verify_vjp`` and ``verify_jvp`` in each dtype."""
    case = library_cases()[index]
    return [verify(case.fn, *cast_case(case.args, d), reference=case.reference, name=case.name,
                   **case.options) for d in dtypes for verify in (verify_vjp, verify_jvp)]


def _worker_init():
    jax.config.update("jax_enable_x64", True)


def library_reports(module: str | None = None, dtypes=("float32", "float64"),
                    jobs: int = 1) -> list[Report]:
    """``verify_vjp`` and ``verify_jvp`` of every case (or those whose name contains
    ``module``) in ``dtypes``,
    over ``jobs`` processes (JAX compiles on one core; the cases are independent)."""
    picked = [i for i, c in enumerate(library_cases()) if not module or module in c.name]
    dtypes = tuple(dtypes)
    if jobs <= 1 or len(picked) < 2:
        return [r for i in picked for r in _run(i, dtypes)]
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init) as pool:
        return [r for rs in pool.map(_run, picked, [dtypes] * len(picked)) for r in rs]

"""``jbackprop bench``, forward mode: the hand-written JVP rules against autodiff of the reference.

Two measurements, on the configurations of ``bench_models.CONFIGS`` (same sizes, same
parameters, same batch as the training-step benchmark):

* **jvp** (the MLPs and the layer-norm net): ``jax.jvp`` of the mean loss with respect to the
  parameters *and* the inputs, one random tangent for each. ``manual`` runs jbackprop's
  hand-written JVP rules; ``autodiff`` is ``jax.jvp`` of the pure-``jnp`` reference, what a user
  without jbackprop would write.
* **hvp** (the MLPs and ResNet-S): a Hessian-vector product of the mean loss with respect to
  the parameters, ``H v``. ``manual`` is forward over reverse with jbackprop's modules,
  ``jax.jvp(jax.grad(loss), (params,), (v,))``; ``manual, rev-over-rev`` is reverse over reverse
  with the same modules, ``jax.grad(lambda p: vdot(jax.grad(loss)(p), v))``; ``autodiff`` is
  forward over reverse of the reference (the baseline).

As in the training-step benchmark, each version is jit-compiled (compile time, and
``temp_size_in_bytes`` of ``memory_analysis()``: the temporary memory), all versions of one
configuration are timed **interleaved** (one call of each per round, in shuffled order) and the
report gives medians. ``rel_diff_vs_autodiff`` checks that the versions compute the same
numbers. Entry point for this section alone: ``run`` (or ``python -m jbackprop.bench.forward``).
"""
from __future__ import annotations

import statistics
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jbackprop.bench import harness as bench_harness, models as bench_models

MODES = {"mlp-large": ("jvp", "hvp"),    # the configurations with a forward-mode row, and
         "mlp-small": ("jvp", "hvp"),    # which: jax.jvp on the MLPs and the layer-norm net,
         "resnet-s": ("hvp",),           # Hessian-vector products on the MLPs and ResNet-S
         "layernorm-net": ("jvp",)}
WHAT = {"jvp": "jax.jvp of the mean loss w.r.t. parameters and inputs",
        "hvp": "Hessian-vector product of the mean loss w.r.t. the parameters"}


def tree_vdot(a, b) -> jax.Array:
    """``Σ_leaves vdot(a_leaf, b_leaf)``: the inner product of two pytrees of one structure."""
    return sum(jnp.vdot(u, w) for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tangent_like(tree, seed: int):
    """A random (normal) tangent with the structure, shapes and dtypes of ``tree``."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, a.shape, a.dtype)
                                        for k, a in zip(keys, leaves)])


def jvp_of(loss: Callable) -> Callable:
    """``(params, x, y, dparams, dx) -> (loss, loss tangent)``: ``jax.jvp`` of the loss w.r.t.
    parameters and inputs."""
    def f(params, x, y, dparams, dx):
        return jax.jvp(lambda p, xs: loss(p, xs, y), (params, x), (dparams, dx))
    return f


def hvp_fwd_over_rev(loss: Callable) -> Callable:
    """``(params, x, y, v) -> H v``, forward over reverse: ``jax.jvp`` of ``jax.grad``."""
    def f(params, x, y, v):
        return jax.jvp(lambda p: jax.grad(loss)(p, x, y), (params,), (v,))[1]
    return f


def hvp_rev_over_rev(loss: Callable) -> Callable:
    """``(params, x, y, v) -> H v``, reverse over reverse: ``jax.grad`` of ``vdot(∇L, v)``."""
    def f(params, x, y, v):
        return jax.grad(lambda p: tree_vdot(jax.grad(loss)(p, x, y), v))(params)
    return f


def _ratio(a, b):
    return a / b if a is not None and b else None


def versions(problem: bench_models.Problem, modes=("jvp", "hvp")
             ) -> dict[str, dict[str, tuple[Callable, tuple]]]:
    """``{mode: {version: (function, arguments)}}`` of a built configuration, for ``modes``."""
    p, x, y = problem.params, problem.x, problem.y
    manual, autodiff = problem.losses["manual"], problem.losses["autodiff"]
    out: dict[str, dict[str, tuple[Callable, tuple]]] = {}
    if "jvp" in modes:
        args = (p, x, y, tangent_like(p, 1), tangent_like(x, 2))
        out["jvp"] = {"manual": (jvp_of(manual), args), "autodiff": (jvp_of(autodiff), args)}
    if "hvp" in modes:
        args = (p, x, y, tangent_like(p, 3))
        out["hvp"] = {"manual": (hvp_fwd_over_rev(manual), args),
                      "manual, rev-over-rev": (hvp_rev_over_rev(manual), args),
                      "autodiff": (hvp_fwd_over_rev(autodiff), args)}
    return out


def run_config(config: bench_models.Config, problem: bench_models.Problem, budget_s: float,
               repeat: int = 1) -> list[dict]:
    """Compile and time the forward-mode versions (``MODES``) of one built configuration,
    interleaved in one set of rounds; one record per mode."""
    modes = versions(problem, MODES.get(config.name, ()))
    calls: dict[tuple[str, str], Callable[[], Any]] = {}
    records = {}
    for mode, fns in modes.items():
        rec = records[mode] = {"config": config.name, "description": config.description,
                               "mode": mode, "what": WHAT[mode], "baseline": "autodiff",
                               "versions": {}}
        values = {}
        for version, (fn, args) in fns.items():
            compiled, compile_s, temp = bench_harness.compile_timed(fn, *args)
            values[version] = compiled(*args)
            calls[(mode, version)] = lambda c=compiled, a=args: c(*a)
            rec["versions"][version] = {"compile_s": compile_s, "temp_bytes": temp,
                                        **bench_harness._cost(compiled)}
        for version, value in values.items():
            rec["versions"][version]["rel_diff_vs_autodiff"] = \
                bench_harness._max_rel_diff(value, values["autodiff"])
    if not calls:
        return []
    runs = [bench_harness.interleaved_medians(calls, budget_s) for _ in range(repeat)]
    for (mode, version) in calls:
        records[mode]["versions"][version]["ms"] = \
            1e3 * statistics.median(r[(mode, version)] for r in runs)
    for mode, rec in records.items():
        v = rec["versions"]
        rec["time_ratio_runs"] = [r[(mode, "manual")] / r[(mode, "autodiff")] for r in runs]
        rec["time_manual_over_autodiff"] = v["manual"]["ms"] / v["autodiff"]["ms"]
        rec["temp_manual_over_autodiff"] = _ratio(v["manual"]["temp_bytes"],
                                                  v["autodiff"]["temp_bytes"])
        if "manual, rev-over-rev" in v:
            rr = v["manual, rev-over-rev"]
            rec["time_manual_over_rev_over_rev"] = v["manual"]["ms"] / rr["ms"]
            rec["temp_manual_over_rev_over_rev"] = _ratio(v["manual"]["temp_bytes"],
                                                          rr["temp_bytes"])
    return list(records.values())


def run(names=None, quick: bool = False, budget_s: float = 4.0,
        progress: Callable[[str], None] = print, repeat: int = 1) -> list[dict]:
    """The forward-mode section: the records of every selected configuration (all if ``names``
    is empty) that has a forward-mode row (``MODES``)."""
    records = []
    for config in bench_models.select(names):
        if config.name in MODES:
            progress(f"forward mode, {config.name}: {config.description}")
            records += run_config(config, config.build(quick), budget_s, repeat)
    return records


def targets(records: list[dict]) -> list[dict]:
    """Forward-mode targets: time and temporary memory, manual over autodiff, ≤ 1.0."""
    out = []
    for r in records:
        for what, key in (("time", "time_manual_over_autodiff"),
                          ("temp memory", "temp_manual_over_autodiff")):
            if r.get(key) is not None:
                out.append({"target": f"{r['config']}: {r['mode']} {what} manual/autodiff",
                            "value": r[key], "limit": 1.0, "ok": r[key] <= 1.0})
    return out


def main(argv=None) -> int:
    """This section alone: ``python -m jbackprop.bench.forward [NAME ...] [--quick]
    [--budget S] [--repeat N] [--json PATH]`` (the table on stdout, the records as JSON)."""
    import argparse
    import json
    from jbackprop.bench import report as bench_report

    parser = argparse.ArgumentParser(prog="python -m jbackprop.bench.forward")
    parser.add_argument("config", nargs="*")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", default="bench-forward.json")
    args = parser.parse_args(argv)
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 4.0)
    result = {"machine": bench_harness.machine(), "quick": args.quick}
    result["forward"] = run(args.config, args.quick, budget,
                            lambda s: print(s, file=sys.stderr, flush=True), args.repeat)
    result["targets"] = targets(result["forward"])
    print("\n".join(bench_report.forward_lines(result)))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

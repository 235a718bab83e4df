"""``jbackprop bench``: hand-written backward against ``jax.grad``, timed as whole training steps.

For every configuration of ``bench_models.CONFIGS``, each version (``manual``: jbackprop's
hand-written backward; ``autodiff``: ``jax.grad`` of the pure-jnp reference; ``manual,
batched``: the modules called on the batch instead of vmapped; ``lax.conv``, for the
convolutional configurations: ``jax.grad`` of the net written with
``jax.lax.conv_general_dilated``) is jit-compiled three ways —
the training step (forward, backward, optax Adam update), the forward alone (the mean loss) and
forward + backward (``value_and_grad``) — and all of them are timed **interleaved** (one call
of each per round, after warm-up) so that the machine's drift hits every version alike; the
report gives medians. The optional columns (PyTorch, Equinox, Flax, from ``bench_external``)
are interleaved among themselves, after the JAX versions: PyTorch's OpenMP threads keep
spinning after each call and would slow whatever runs next.

Each configuration's record names its **baseline** (``Problem.baseline``): the version a user
without jbackprop would write — ``lax.conv`` for the convolutional nets, ``autodiff`` (plain
``jnp``) for the rest. The headline ratios and the targets are manual over baseline; for the
convolutions, manual over ``autodiff`` (the shifted-slice reference) is a secondary figure.

Compile time is ``lower`` + ``compile`` of the step. Memory is ``temp_size_in_bytes`` of the
compiled executables' ``memory_analysis()``: ``temp_bytes`` of forward + backward (the
activations and residuals the backward keeps: the comparison that matters) and
``step_temp_bytes`` of the whole step (on the CPU, XLA parks activations in the buffers of
the updated parameters, so the step's temporary memory can read as zero). A GEMM probe (a large
``a @ b``) gives this machine's matrix-multiply rate, so that step throughput can be read as a
fraction of it.

The forward-mode section (``bench_forward``, after the configurations) times ``jax.jvp`` and
Hessian-vector products with the hand-written JVP rules against autodiff of the reference.
"""
from __future__ import annotations

import datetime
import functools
import importlib
import json
import os
import platform
import random
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import jbackprop as jb
from jbackprop import train
from jbackprop.bench import external as bench_external, models as bench_models, report as bench_report
from jbackprop.bench.models import Problem
from jbackprop.bench.report import baseline, ratios


def train_step(loss: Callable, opt: optax.GradientTransformation) -> Callable:
    """``(params, opt_state, x, y) -> (params, opt_state, loss)``: the library's own training
    step (``jbackprop.train.train_step``) for ``loss`` and ``opt``."""
    return functools.partial(train.train_step, loss, opt)


def compile_timed(fn: Callable, *args) -> tuple[Callable, float, int | None]:
    """``jax.jit(fn)`` lowered and compiled for ``args``: (executable, seconds, temp bytes)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
    return compiled, seconds, temp


def interleaved_medians(calls: dict[str, Callable[[], Any]], budget_s: float,
                        min_rounds: int = 5, max_rounds: int = 400) -> dict[str, float]:
    """Median seconds of each call, timed round-robin (one call of each per round, in an order
    shuffled every round, so that no call always inherits the caches of the same predecessor).

    Two warm-up rounds first; the number of rounds fits ``budget_s`` from the warm-up's timing,
    between ``min_rounds`` and ``max_rounds``.
    """
    def once(f):
        start = time.perf_counter()
        jax.block_until_ready(f())
        return time.perf_counter() - start

    for _ in range(2):
        warm = sum(once(f) for f in calls.values())
    rounds = int(min(max(budget_s / max(warm, 1e-9), min_rounds), max_rounds))
    times: dict[str, list[float]] = {k: [] for k in calls}
    order, shuffle = list(calls), random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)          # no version always runs right after the same other one
        for k in order:
            times[k].append(once(calls[k]))
    return {k: statistics.median(v) for k, v in times.items()}


def gemm_call(n: int) -> Callable[[], Any]:
    """One float32 ``a @ b`` with ``a, b`` of shape (n, n), compiled: ``2 n³`` FLOPs a call."""
    a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), jnp.float32) for i in (0, 1))
    f, _, _ = compile_timed(jnp.matmul, a, b)
    return lambda: f(a, b)


def gemm_probe(n: int = 2048, budget_s: float = 3.0) -> dict:
    """This machine's float32 matrix-multiply rate, from ``gemm_call(n)``."""
    seconds = interleaved_medians({"gemm": gemm_call(n)}, budget_s)["gemm"]
    return {"n": n, "dtype": "float32", "ms": 1e3 * seconds, "gflops": 2 * n ** 3 / seconds / 1e9}


def mlp_matmuls(sizes, batch: int) -> Callable[[], Any]:
    """Only the matrix multiplies of an MLP training step, at its shapes: per layer ``X Wᵀ``
    (forward), ``V W`` (B[MM, z]) and ``Vᵀ X`` (B[MM, W]). Their time is the floor that no
    backward, hand-written or not, can go under; it shows how much of a GEMM probe's rate these
    shapes can reach at all."""
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 3 * len(sizes)))
    normal = lambda shape: jax.random.normal(next(keys), shape, jnp.float32)
    xs = [normal((batch, m)) for m in sizes[:-1]]
    vs = [normal((batch, n)) for n in sizes[1:]]
    ws = [normal((n, m)) for m, n in zip(sizes[:-1], sizes[1:])]
    f, _, _ = compile_timed(lambda xs, vs, ws: [(x @ w.T, v @ w, v.T @ x)
                                                for x, v, w in zip(xs, vs, ws)], xs, vs, ws)
    return lambda: f(xs, vs, ws)


def _cost(compiled) -> dict:
    """XLA's static estimate for an executable: bytes accessed and kernels launched. Unlike
    times, these do not move with the machine's load (loops are counted once)."""
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, list) else (cost or {})
    text = compiled.as_text()
    entry = text[text.find("ENTRY"):]
    return {"bytes_accessed": cost.get("bytes accessed"),
            "kernels": entry.count(" fusion(") + entry.count(" dot(") + entry.count(" copy(")}


def _max_rel_diff(a, b) -> float:
    """max |a − b| / max |b| over all leaves: the two versions compute the same gradient."""
    num = max(float(jnp.max(jnp.abs(x - y), initial=0.0))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = max(float(jnp.max(jnp.abs(y), initial=0.0)) for y in jax.tree.leaves(b))
    return num / max(den, 1e-30)


def run_config(config: bench_models.Config, quick: bool, budget_s: float,
               external: bool, repeat: int = 1) -> dict:
    """Build, compile and time every version of one configuration; returns its JSON record.

    With ``repeat > 1`` the interleaved timing runs that many times; times are the medians of
    the runs' medians, and ``step_ratio_runs`` keeps each run's manual/autodiff ratio (its
    spread is the measurement's noise).
    """
    problem: Problem = config.build(quick)
    opt = optax.adam(1e-3)
    args = (problem.params, opt.init(problem.params), problem.x, problem.y)
    calls, record = {}, {"name": config.name, "description": config.description,
                         "matmul_flops": problem.matmul_flops, "baseline": problem.baseline,
                         "versions": {}}
    grads = {}
    for version, loss in problem.losses.items():
        step, compile_s, step_temp = compile_timed(train_step(loss, opt), *args)
        fwd, _, _ = compile_timed(loss, *args[:1], *args[2:])
        grad, _, temp = compile_timed(jax.value_and_grad(loss), *args[:1], *args[2:])
        grads[version] = grad(problem.params, problem.x, problem.y)[1]
        calls[(version, "step")] = lambda step=step: step(*args)
        calls[(version, "fwd")] = lambda fwd=fwd: fwd(problem.params, problem.x, problem.y)
        calls[(version, "grad")] = lambda grad=grad: grad(problem.params, problem.x, problem.y)
        record["versions"][version] = {"compile_s": compile_s, "temp_bytes": temp,
                                       "step_temp_bytes": step_temp, **_cost(grad)}
    for version in grads:
        record["versions"][version]["grad_rel_diff_vs_autodiff"] = \
            _max_rel_diff(grads[version], grads["autodiff"])
    n = 256 if quick else 2048
    if problem.spec["kind"] == "mlp":      # the GEMM probe in the same rounds: the same load
        calls[("matmuls only", "step")] = mlp_matmuls(problem.spec["sizes"], problem.spec["batch"])
        calls[("gemm probe", "step")] = gemm_call(n)
    runs = [interleaved_medians(calls, budget_s) for _ in range(repeat)]
    medians = {k: statistics.median(run[k] for run in runs) for k in calls}
    record["step_ratio_runs"] = [run[("manual", "step")] / run[(problem.baseline, "step")]
                                 for run in runs]      # manual / baseline, run by run
    if ("matmuls only", "step") in medians:
        record["matmuls_only_ms"] = 1e3 * medians.pop(("matmuls only", "step"))
        record["gemm_probe_gflops"] = 2 * n ** 3 / medians.pop(("gemm probe", "step")) / 1e9
    if external:   # timed apart: PyTorch's spinning OpenMP threads would slow the JAX calls
        record["external_skipped"] = bench_external.skipped(problem.spec)
        steps = bench_external.steps(problem.spec, problem.x, problem.y)
        for name, seconds in interleaved_medians(steps, budget_s).items() if steps else ():
            medians[(name, "step")] = seconds
            record["versions"][name] = {}
    for (version, what), seconds in medians.items():
        record["versions"][version][f"{what}_ms"] = 1e3 * seconds
    for v in record["versions"].values():
        if "grad_ms" in v:
            v["bwd_over_fwd"] = (v["grad_ms"] - v["fwd_ms"]) / v["fwd_ms"]
    return record


def compile_vs_depth(depths=(8, 1024), width: int = 64, batch: int = 32,
                     repeats: int = 3) -> dict[int, float]:
    """Median seconds to trace and compile ``jit(grad)`` of a vmapped ResNet-S at each depth."""
    def seconds(depth):
        params = jb.resnet_s_init(jax.random.PRNGKey(0), 16, width, depth, 10)
        x, y = jnp.ones((batch, 16)), jnp.zeros((batch,), jnp.int32)
        loss = bench_models.per_example(jb, bench_models.resnet_apply)    # a fresh function
        return compile_timed(jax.grad(loss), params, x, y)[1]             # each time
    seconds(2)                                                                 # warm up JAX
    return {d: statistics.median(seconds(d) for _ in range(repeats)) for d in depths}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    device = jax.devices()[0]
    return {"date": datetime.date.today().isoformat(), "platform": device.platform,
            "device": device.device_kind, "devices": jax.device_count(),
            "cpu_count": os.cpu_count(), "processor": _cpu_name(),
            "python": platform.python_version(), "jax": jax.__version__,
            "external": bench_external.available()}


def targets(result: dict) -> list[dict]:
    """The performance targets, each with its measured value and whether it holds."""
    out = []

    def add(what, value, limit):
        out.append({"target": what, "value": value, "limit": limit, "ok": value <= limit})

    for r in result["configs"]:
        q, base = ratios(r), baseline(r)
        limit = 0.85 if r["name"] == "layernorm-net" else 1.00
        add(f"{r['name']}: step manual/{base}", q["step_manual_over_baseline"], limit)
        if "temp_manual_over_baseline" in q:
            add(f"{r['name']}: temp memory manual/{base}", q["temp_manual_over_baseline"],
                0.7 if r["name"] == "transformer" else 1.0)
        if "step_vmap_over_batched" in q:
            add(f"{r['name']}: vmap-batched/batched step", q["step_vmap_over_batched"], 1.05)
        if r["name"].startswith("mlp"):
            add(f"{r['name']}: backward/forward (manual)", r["versions"]["manual"]["bwd_over_fwd"], 2.2)
        if r["name"] == "mlp-large":
            frac = r["matmul_flops"] / (r["versions"]["manual"]["step_ms"] * 1e-3) / 1e9 \
                / r.get("gemm_probe_gflops", result["gemm"]["gflops"])
            r["fraction_of_gemm"] = frac
            out.append({"target": "mlp-large: step FLOP rate / GEMM probe", "value": frac,
                        "limit": 0.85, "ok": frac >= 0.85})
            grad_frac = frac * r["versions"]["manual"]["step_ms"] / r["versions"]["manual"]["grad_ms"]
            out.append({"target": "mlp-large: forward+backward FLOP rate / GEMM probe (no Adam)",
                        "value": grad_frac, "limit": 0.85, "ok": grad_frac >= 0.85})
            if "matmuls_only_ms" in r:   # the same FLOPs as bare GEMMs: the reachable ceiling
                r["matmuls_only_fraction_of_gemm"] = frac * r["versions"]["manual"]["step_ms"] \
                    / r["matmuls_only_ms"]
        if "step_manual_over_torch.compile" in q and r["name"] == "mlp-large":
            add("mlp-large: step manual/torch.compile", q["step_manual_over_torch.compile"], 1.0)
    for d, s in result.get("compile_vs_depth", {}).items():
        if int(d) >= 1024:
            add(f"ResNet-S compile, depth {d} (s)", s, 2.0)
    if result.get("forward"):
        from jbackprop.bench import forward as bench_forward     # (it imports this module)
        out += bench_forward.targets(result["forward"])
    for name, section in sections(result):
        out += section.targets(result[name])
    return out


# Sections run with the whole suite (not with --config): each a module of jbackprop.bench with
# run(quick, budget_s, progress, repeat), targets(records), lines(records), TITLE (and plot).
SECTIONS = ("attention", "fused_loss")


def sections(result: dict) -> list:
    """``(name, module)`` of each section that ``result`` holds, in ``SECTIONS`` order."""
    return [(name, importlib.import_module(f"jbackprop.bench.{name}"))
            for name in SECTIONS if result.get(name)]


def target(name: str, value: float, limit: float) -> dict:
    """One target record of a section: ``value ≤ limit``."""
    return {"target": name, "value": value, "limit": limit, "ok": value <= limit}


def section_main(section, name: str, argv=None) -> int:
    """One section alone: ``python -m jbackprop.bench.<name> [--quick] [--budget S]
    [--repeat N] [--json PATH] [--plot PNG]`` (``--plot`` where the section draws one)."""
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog=f"python -m jbackprop.bench.{name}")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", default=f"bench-{name.replace('_', '-')}.json")
    if hasattr(section, "plot"):
        parser.add_argument("--plot", metavar="PNG")
    args = parser.parse_args(argv)
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 4.0)
    result = {"machine": machine(), "quick": args.quick}
    result[name] = section.run(args.quick, budget, lambda s: print(s, file=sys.stderr),
                               args.repeat)
    result["targets"] = section.targets(result[name])
    print("\n".join(section.lines(result[name])))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    if getattr(args, "plot", None):
        section.plot(result[name], args.plot)
    return 0


def run(names=None, quick=False, budget_s=4.0, external=True, depths=(8, 1024),
        progress: Callable[[str], None] = print, repeat: int = 1, forward: bool = True,
        skip: tuple = ()) -> dict:
    """Run the suite; returns the result dict (machine, GEMM probe, configs, the forward-mode
    section when ``forward`` (``bench_forward``: ``jax.jvp`` and Hessian-vector products), the
    ``SECTIONS`` not in ``skip`` (attention: memory and time against n; the fused loss: memory
    and time against the unfused loss), targets)."""
    result: dict[str, Any] = {"machine": machine(), "quick": quick}
    result["gemm"] = gemm_probe(256 if quick else 2048, budget_s=min(budget_s, 3.0))
    result["configs"] = []
    for config in bench_models.select(names):
        progress(f"{config.name}: {config.description}")
        result["configs"].append(run_config(config, quick, budget_s, external, repeat))
    if forward:
        from jbackprop.bench import forward as bench_forward     # (it imports this module)
        result["forward"] = bench_forward.run(names, quick, budget_s, progress, repeat)
    for name in SECTIONS if not names else ():   # with the whole suite, not with --config
        if name not in skip:
            section = importlib.import_module(f"jbackprop.bench.{name}")
            result[name] = section.run(quick, budget_s, progress, repeat)
    if depths:
        progress("ResNet-S compile time against depth")
        result["compile_vs_depth"] = compile_vs_depth(depths, repeats=1 if quick else 3)
    result["targets"] = targets(result)
    return result


def main(args) -> int:
    """``jbackprop bench`` (see ``cli.py`` for the options)."""
    import sys
    depths = () if args.no_compile_depth else ((2, 8) if args.quick else (8, 1024))
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 4.0)
    result = run(args.config, args.quick, budget, not args.no_external, depths,
                 progress=lambda s: print(s, file=sys.stderr, flush=True), repeat=args.repeat,
                 forward=not getattr(args, "no_forward", False),
                 skip=tuple(name for name in SECTIONS
                            if getattr(args, "no_" + name, False)))
    print(bench_report.format_table(result))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(bench_report.format_markdown(result))
        print(f"wrote {args.markdown}")
    if args.plot:
        bench_report.plot(result, args.plot)
        print(f"wrote {args.plot}")
        for name, section in sections(result):
            if hasattr(section, "plot"):
                chart = args.plot.rsplit(".", 1)[0] + f"-{name}.png"
                section.plot(result[name], chart)
                print(f"wrote {chart}")
    return 0

"""How ``jbackprop bench`` shows its results: a plain-text table, Markdown tables (for
docs/benchmarks.md) and a bar chart of step-time ratios."""
from __future__ import annotations

import numpy as np

from jbackprop._optional import import_optional
from jbackprop.bench import models as bench_models


def ratios(record: dict) -> dict:
    """Step-time and memory ratios of a configuration's record (manual over autodiff, …)."""
    v = record["versions"]
    out = {"step_manual_over_autodiff": v["manual"]["step_ms"] / v["autodiff"]["step_ms"]}
    if v["manual"]["temp_bytes"] is not None and v["autodiff"]["temp_bytes"]:
        out["temp_manual_over_autodiff"] = v["manual"]["temp_bytes"] / v["autodiff"]["temp_bytes"]
    if "manual, batched" in v:
        out["step_vmap_over_batched"] = v["manual"]["step_ms"] / v["manual, batched"]["step_ms"]
    for name in v:
        if name not in bench_models.LIBS and name != "manual, batched" and "step_ms" in v[name]:
            out[f"step_manual_over_{name}"] = v["manual"]["step_ms"] / v[name]["step_ms"]
    return out


def _spread(record: dict) -> str:
    """`` (lo–hi)`` of the per-run manual/autodiff ratios when the timing was repeated."""
    runs = record.get("step_ratio_runs", ())
    return f" ({min(runs):.2f}–{max(runs):.2f})" if len(runs) > 1 else ""


def _mb(b):
    return "—" if b is None else f"{b / 2 ** 20:.1f}"


def format_table(result: dict) -> str:
    """The report as a plain-text table: one row per configuration, then the targets."""
    head = ("config", "manual ms", "autodiff ms", "ratio", "batched ms", "vmap/batch",
            "bwd/fwd man.", "bwd/fwd auto.", "compile s m/a", "temp MB m/a", "MB moved m/a",
            "|Δg| rel")
    rows = []
    for r in result["configs"]:
        v, q = r["versions"], ratios(r)
        m, a, b = v["manual"], v["autodiff"], v.get("manual, batched")
        rows.append((r["name"], f"{m['step_ms']:.2f}", f"{a['step_ms']:.2f}",
                     f"{q['step_manual_over_autodiff']:.2f}" + _spread(r),
                     f"{b['step_ms']:.2f}" if b else "—",
                     f"{q['step_vmap_over_batched']:.2f}" if b else "—",
                     f"{m['bwd_over_fwd']:.2f}", f"{a['bwd_over_fwd']:.2f}",
                     f"{m['compile_s']:.2f}/{a['compile_s']:.2f}",
                     f"{_mb(m['temp_bytes'])}/{_mb(a['temp_bytes'])}",
                     f"{_mb(m['bytes_accessed'])}/{_mb(a['bytes_accessed'])}",
                     f"{m['grad_rel_diff_vs_autodiff']:.0e}"))
    extra = sorted({k for r in result["configs"] for k in r["versions"]} - set(bench_models.LIBS)
                   - {"manual, batched"})
    if extra:
        head = head + tuple(f"{k} ms" for k in extra)
        rows = [row + tuple(f"{r['versions'][k]['step_ms']:.2f}" if k in r["versions"] else "—"
                            for k in extra) for row, r in zip(rows, result["configs"])]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    m = result["machine"]
    out = [f"{m['device']} ({m['platform']}, {m['cpu_count']} cores), jax {m['jax']}, {m['date']}; "
           f"GEMM probe {result['gemm']['n']}² float32: {result['gemm']['gflops']:.1f} GFLOP/s",
           "step = forward + backward + Adam update, jit; medians of interleaved runs; temp and "
           "MB moved (XLA's bytes accessed) are of forward + backward", "",
           line(head), line(["-" * w for w in widths])]
    out += [line(row) for row in rows]
    for r in result["configs"]:
        if "matmuls_only_ms" in r:
            rate = r["matmul_flops"] / r["matmuls_only_ms"] / 1e6
            out.append(f"{r['name']}: GEMM probe in the same rounds {r['gemm_probe_gflops']:.0f} "
                       f"GFLOP/s; the step's matrix multiplies alone take "
                       f"{r['matmuls_only_ms']:.2f} ms ({rate:.0f} GFLOP/s, "
                       f"{100 * rate / r['gemm_probe_gflops']:.0f} % of the probe); the manual "
                       f"step {r['versions']['manual']['step_ms']:.2f} ms")
    if result.get("compile_vs_depth"):
        out.append("\nResNet-S trace+compile of jit(grad): " + ", ".join(
            f"depth {d}: {s:.2f} s" for d, s in result["compile_vs_depth"].items()))
    out.append("\ntargets:")
    for t in result["targets"]:
        sign = "≥" if "GEMM" in t["target"] else "≤"
        out.append(f"  {'ok  ' if t['ok'] else 'MISS'} {t['target']}: {t['value']:.3f} "
                   f"(target {sign} {t['limit']})")
    return "\n".join(out)


def plot(result: dict, path: str) -> None:
    """Bar chart of step time relative to ``jax.grad`` (autodiff = 1) for every version."""
    figure = import_optional("matplotlib.figure", "the benchmark chart (--plot)")

    names = [r["name"] for r in result["configs"]]
    versions = [k for k in ("manual", "manual, batched", "torch eager", "torch.compile",
                            "equinox") if any(k in r["versions"] for r in result["configs"])]
    fig = figure.Figure(figsize=(10, 4.2))
    ax = fig.subplots()
    width = 0.8 / len(versions)
    for i, k in enumerate(versions):
        vals = [r["versions"][k]["step_ms"] / r["versions"]["autodiff"]["step_ms"]
                if k in r["versions"] else np.nan for r in result["configs"]]
        ax.bar(np.arange(len(names)) + (i - (len(versions) - 1) / 2) * width, vals, width, label=k)
    ax.axhline(1.0, color="k", lw=1, ls="--", label="jax.grad of the reference")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("step time / autodiff step time")
    m = result["machine"]
    ax.set_title(f"Training step time relative to jax.grad (lower is faster) — {m['device']}, "
                 f"{m['cpu_count']} cores, {m['date']}", fontsize=10)
    top = max(r["versions"][k]["step_ms"] / r["versions"]["autodiff"]["step_ms"]
              for r in result["configs"] for k in versions if k in r["versions"])
    ax.set_ylim(0, top * 1.3)
    ax.legend(fontsize=8, ncol=3, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)




def format_markdown(result: dict) -> str:
    """The results and the targets as Markdown tables (what docs/benchmarks.md shows)."""
    m = result["machine"]
    extra = [k for k in ("equinox", "torch eager", "torch.compile")
             if any(k in r["versions"] for r in result["configs"])]
    out = [f"Machine: {m['processor']}, {m['cpu_count']} cores ({m['device']}), jax {m['jax']}, "
           f"Python {m['python']}, {m['date']}. GEMM probe ({result['gemm']['n']}² float32): "
           f"{result['gemm']['gflops']:.0f} GFLOP/s.", "",
           "| " + " | ".join(["configuration", "manual ms", "autodiff ms", "manual / autodiff",
                              "batched ms", "vmap / batched", "bwd/fwd manual",
                              "bwd/fwd autodiff", "compile s (m / a)", "temp MiB (m / a)",
                              "MiB moved (m / a)"] + [f"{k} ms" for k in extra]) + " |",
           "|" + " --- |" * (11 + len(extra))]
    for r in result["configs"]:
        v, q = r["versions"], ratios(r)
        man, aut, bat = v["manual"], v["autodiff"], v.get("manual, batched")
        cells = [f"`{r['name']}`: {r['description']}", f"{man['step_ms']:.2f}",
                 f"{aut['step_ms']:.2f}", f"**{q['step_manual_over_autodiff']:.2f}**",
                 f"{bat['step_ms']:.2f}" if bat else "—",
                 f"{q['step_vmap_over_batched']:.2f}" if bat else "—",
                 f"{man['bwd_over_fwd']:.2f}", f"{aut['bwd_over_fwd']:.2f}",
                 f"{man['compile_s']:.2f} / {aut['compile_s']:.2f}",
                 f"{_mb(man['temp_bytes'])} / {_mb(aut['temp_bytes'])}",
                 f"{_mb(man['bytes_accessed'])} / {_mb(aut['bytes_accessed'])}"]
        cells[3] += _spread(r)
        cells += [f"{v[k]['step_ms']:.2f}" if k in v else "—" for k in extra]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "| target | measured | limit | |", "| --- | --- | --- | --- |"]
    for t in result["targets"]:
        sign = "≥" if "GEMM" in t["target"] else "≤"
        out.append(f"| {t['target']} | {t['value']:.3f} | {sign} {t['limit']} | "
                   f"{'met' if t['ok'] else '**missed**'} |")
    return "\n".join(out) + "\n"

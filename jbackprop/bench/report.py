"""How ``jbackprop bench`` shows its results: a plain-text table, Markdown tables (for
docs/benchmarks.md) and a bar chart of step-time ratios."""
from __future__ import annotations

import numpy as np

from jbackprop._optional import import_optional
from jbackprop.bench import models as bench_models


EXTERNAL = ("equinox", "flax", "torch eager", "torch.compile")   # optional columns, in order

BASELINE_LABEL = {"autodiff": "`jax.grad` of plain `jnp`",                 # (Markdown)
                  "lax.conv": "`jax.grad` of `lax.conv_general_dilated`"}


def baseline(record: dict) -> str:
    """The version a user without jbackprop would write (``lax.conv`` for the convolutional
    nets, ``autodiff``, i.e. ``jax.grad`` of plain ``jnp``, for the rest)."""
    return record.get("baseline", "autodiff")


def ratios(record: dict) -> dict:
    """Step-time and memory ratios of a configuration's record: manual over the baseline (the
    headline), manual over autodiff (for the convolutions: ``jax.grad`` of the shifted-slice
    reference, a secondary figure), vmap over batched, manual over each other column."""
    v, base = record["versions"], baseline(record)
    out = {}
    for key, other in (("baseline", base), ("autodiff", "autodiff")):
        out[f"step_manual_over_{key}"] = v["manual"]["step_ms"] / v[other]["step_ms"]
        if v["manual"]["temp_bytes"] is not None and v[other]["temp_bytes"]:
            out[f"temp_manual_over_{key}"] = v["manual"]["temp_bytes"] / v[other]["temp_bytes"]
    if "manual, batched" in v:
        out["step_vmap_over_batched"] = v["manual"]["step_ms"] / v["manual, batched"]["step_ms"]
    for name in v:
        if name not in bench_models.LIBS and name != "manual, batched" and "step_ms" in v[name]:
            out[f"step_manual_over_{name}"] = v["manual"]["step_ms"] / v[name]["step_ms"]
    return out


def _spread(record: dict) -> str:
    """`` (lo–hi)`` of the per-run manual/baseline ratios when the timing was repeated."""
    runs = record.get("step_ratio_runs", ())
    return f" ({min(runs):.2f}–{max(runs):.2f})" if len(runs) > 1 else ""


def _mb(b):
    return "—" if b is None else f"{b / 2 ** 20:.1f}"


def _extra(result: dict) -> list[str]:
    return [k for k in EXTERNAL if any(k in r["versions"] for r in result["configs"])]


def _secondary(r: dict, sep: str = " / ") -> str:
    """``jax.grad`` of the shifted-slice reference (where it is not the baseline): its step
    time and manual over it."""
    if baseline(r) == "autodiff":
        return "—"
    ref = r["versions"]["autodiff"]
    return f"{ref['step_ms']:.2f}{sep}{ratios(r)['step_manual_over_autodiff']:.2f}"


def skipped_lines(result: dict) -> list[str]:
    """Why each optional library has no column, one line per library: ``"flax: not
    installed"``, or the configurations it has no model for."""
    reasons: dict[str, dict[str, list[str]]] = {}
    for r in result["configs"]:
        for lib, why in r.get("external_skipped", {}).items():
            key = "no model for" if why.startswith("no ") else why
            reasons.setdefault(lib, {}).setdefault(key, []).append(r["name"])
    out = []
    n = len(result["configs"])
    for lib, whys in reasons.items():
        out.append(f"{lib}: " + ", ".join(
            why + ("" if len(names) == n and why != "no model for" else
                   (" " if why == "no model for" else " for ") + ", ".join(names))
            for why, names in whys.items()))
    return out


FORWARD_HEAD = ("config", "mode", "manual ms", "autodiff ms", "man/auto", "temp MB m/a",
                "temp m/a", "rev-rev ms", "man/rev-rev", "temp MB rev-rev", "temp m/rev-rev",
                "|Δ| rel")


def _r(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def forward_rows(result: dict) -> list[tuple]:
    """One row per forward-mode record (``FORWARD_HEAD``'s columns); the HVP rows add the
    reverse-over-reverse version."""
    rows = []
    for r in result.get("forward", ()):
        v = r["versions"]
        m, a, rr = v["manual"], v["autodiff"], v.get("manual, rev-over-rev")
        runs = r.get("time_ratio_runs", ())
        spread = f" ({min(runs):.2f}–{max(runs):.2f})" if len(runs) > 1 else ""
        diff = max(x["rel_diff_vs_autodiff"] for x in v.values())
        rows.append((r["config"], r["mode"], f"{m['ms']:.2f}", f"{a['ms']:.2f}",
                     _r(r["time_manual_over_autodiff"]) + spread,
                     f"{_mb(m['temp_bytes'])}/{_mb(a['temp_bytes'])}",
                     _r(r["temp_manual_over_autodiff"]),
                     f"{rr['ms']:.2f}" if rr else "—",
                     _r(r.get("time_manual_over_rev_over_rev")),
                     _mb(rr["temp_bytes"]) if rr else "—",
                     _r(r.get("temp_manual_over_rev_over_rev")), f"{diff:.0e}"))
    return rows


def forward_lines(result: dict) -> list[str]:
    """The forward-mode section as plain-text lines (empty if the run has none)."""
    rows = forward_rows(result)
    if not rows:
        return []
    widths = [max(len(str(x)) for x in col) for col in zip(FORWARD_HEAD, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return ["", "forward mode: jvp = jax.jvp of the mean loss w.r.t. parameters and inputs; "
            "hvp = H v of the mean loss w.r.t. the parameters, forward over reverse "
            "(jax.jvp of jax.grad); manual = jbackprop's JVP rules, autodiff = the same of the "
            "plain-jnp reference, rev-rev = reverse over reverse (jax.grad of vdot(grad, v)) "
            "with jbackprop; jit, medians of interleaved runs, temp of each executable",
            line(FORWARD_HEAD), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _sections(result: dict) -> list[str]:
    """The memory sections (attention, the fused loss) as Markdown lines, empty if not run."""
    from jbackprop.bench import harness as bench_harness
    out = []
    for name, section in bench_harness.sections(result):
        out += ["", section.TITLE, "", *section.lines(result[name])]
    return out


def forward_markdown(result: dict) -> list[str]:
    """The forward-mode section as Markdown lines (empty if the run has none)."""
    rows = forward_rows(result)
    if not rows:
        return []
    out = ["", "Forward mode (`jvp`: `jax.jvp` of the mean loss w.r.t. parameters and inputs; "
           "`hvp`: Hessian-vector product w.r.t. the parameters, forward over reverse; "
           "autodiff: the same of the plain-`jnp` reference; rev-over-rev: `jax.grad` of "
           "`vdot(jax.grad(loss), v)` with jbackprop):", "",
           "| " + " | ".join(["configuration", "mode", "manual ms", "autodiff ms",
                              "manual / autodiff", "temp MiB (manual / autodiff)",
                              "temp manual / autodiff", "rev-over-rev ms",
                              "manual / rev-over-rev", "rev-over-rev temp MiB",
                              "temp manual / rev-over-rev", "max rel. diff"]) + " |",
           "|" + " --- |" * 12]
    for row in rows:
        cells = [f"`{row[0]}`", *row[1:]]
        cells[4] = f"**{cells[4]}**"                       # the headline: manual / autodiff
        cells[5] = cells[5].replace("/", " / ")
        out.append("| " + " | ".join(cells) + " |")
    return out


def format_table(result: dict) -> str:
    """The report as a plain-text table: one row per configuration, then the targets."""
    head = ("config", "baseline", "manual ms", "base ms", "man/base", "temp MB m/b",
            "batched ms", "vmap/batch", "bwd/fwd m/b", "compile s m/b", "MB moved m/b",
            "|Δg| rel", "slice-ref ms / man/ref")
    rows = []
    for r in result["configs"]:
        v, q, base = r["versions"], ratios(r), baseline(r)
        m, a, b = v["manual"], v[base], v.get("manual, batched")
        rows.append((r["name"], base, f"{m['step_ms']:.2f}", f"{a['step_ms']:.2f}",
                     f"{q['step_manual_over_baseline']:.2f}" + _spread(r),
                     f"{_mb(m['temp_bytes'])}/{_mb(a['temp_bytes'])}",
                     f"{b['step_ms']:.2f}" if b else "—",
                     f"{q['step_vmap_over_batched']:.2f}" if b else "—",
                     f"{m['bwd_over_fwd']:.2f}/{a['bwd_over_fwd']:.2f}",
                     f"{m['compile_s']:.2f}/{a['compile_s']:.2f}",
                     f"{_mb(m['bytes_accessed'])}/{_mb(a['bytes_accessed'])}",
                     f"{m['grad_rel_diff_vs_autodiff']:.0e}", _secondary(r)))
    extra = _extra(result)
    if extra:
        head = head + tuple(f"{k} ms" for k in extra)
        rows = [row + tuple(f"{r['versions'][k]['step_ms']:.2f}" if k in r["versions"] else "—"
                            for k in extra) for row, r in zip(rows, result["configs"])]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    m = result["machine"]
    out = [f"{m['device']} ({m['platform']}, {m['cpu_count']} cores), jax {m['jax']}, {m['date']}; "
           f"GEMM probe {result['gemm']['n']}² float32: {result['gemm']['gflops']:.1f} GFLOP/s",
           "step = forward + backward + Adam update, jit; medians of interleaved runs; temp and "
           "MB moved (XLA's bytes accessed) are of forward + backward",
           "baseline = what a user without jbackprop writes, differentiated by jax.grad: "
           "lax.conv = lax.conv_general_dilated (the convolutional nets), autodiff = plain jnp; "
           "slice-ref = jax.grad of the shifted-slice reference (secondary)", "",
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
    skipped = skipped_lines(result)
    if skipped:
        out.append("no column: " + "; ".join(skipped))
    out += forward_lines(result)
    out += _sections(result)
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
    """Bar chart of step time relative to each configuration's baseline (= 1): ``jax.grad`` of
    what a user writes (``lax.conv`` for the convolutional nets, plain ``jnp`` otherwise)."""
    figure = import_optional("matplotlib.figure", "the benchmark chart (--plot)")

    names = [r["name"] for r in result["configs"]]
    rel = lambda r, k: r["versions"][k]["step_ms"] / r["versions"][baseline(r)]["step_ms"]
    series = {"manual": lambda r: rel(r, "manual"),
              "manual, batched": lambda r: rel(r, "manual, batched")
              if "manual, batched" in r["versions"] else np.nan,
              "jax.grad of the shifted-slice reference (convolutions)":
                  lambda r: rel(r, "autodiff") if baseline(r) != "autodiff" else np.nan}
    for k in _extra(result):
        series[k] = lambda r, k=k: rel(r, k) if k in r["versions"] else np.nan
    series = {k: [f(r) for r in result["configs"]] for k, f in series.items()}
    series = {k: vals for k, vals in series.items() if not all(np.isnan(vals))}
    fig = figure.Figure(figsize=(11, 4.4))
    ax = fig.subplots()
    width = 0.8 / len(series)
    for i, (k, vals) in enumerate(series.items()):
        ax.bar(np.arange(len(names)) + (i - (len(series) - 1) / 2) * width, vals, width, label=k)
    ax.axhline(1.0, color="k", lw=1, ls="--",
               label="baseline: jax.grad of lax.conv (convolutions) or of plain jnp")
    ax.set_xticks(np.arange(len(names)), names, fontsize=8)
    ax.set_ylabel("step time / baseline step time")
    m = result["machine"]
    ax.set_title(f"Training step time relative to jax.grad of what a user writes (lower is "
                 f"faster) — {m['device']}, {m['cpu_count']} cores, {m['date']}", fontsize=9)
    top = np.nanmax([v for vals in series.values() for v in vals])
    ax.set_ylim(0, top * 1.35)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def format_markdown(result: dict) -> str:
    """The results and the targets as Markdown tables (what docs/benchmarks.md shows)."""
    m = result["machine"]
    extra = _extra(result)
    out = [f"Machine: {m['processor']}, {m['cpu_count']} cores ({m['device']}), jax {m['jax']}, "
           f"Python {m['python']}, {m['date']}. GEMM probe ({result['gemm']['n']}² float32): "
           f"{result['gemm']['gflops']:.0f} GFLOP/s.", "",
           "| " + " | ".join(["configuration", "baseline (what a user writes)", "manual ms",
                              "baseline ms", "manual / baseline", "temp MiB (manual / baseline)",
                              "batched ms", "vmap / batched", "bwd/fwd (manual / baseline)",
                              "compile s (manual / baseline)", "MiB moved (manual / baseline)",
                              "secondary: shifted-slice reference ms / manual ÷ it"]
                             + [f"{k} ms" for k in extra]) + " |",
           "|" + " --- |" * (12 + len(extra))]
    for r in result["configs"]:
        v, q, base = r["versions"], ratios(r), baseline(r)
        man, bas, bat = v["manual"], v[base], v.get("manual, batched")
        temp = q.get("temp_manual_over_baseline")
        cells = [f"`{r['name']}`: {r['description']}", BASELINE_LABEL.get(base, f"`{base}`"),
                 f"{man['step_ms']:.2f}", f"{bas['step_ms']:.2f}",
                 f"**{q['step_manual_over_baseline']:.2f}**" + _spread(r),
                 f"{_mb(man['temp_bytes'])} / {_mb(bas['temp_bytes'])}"
                 + (f" (**{temp:.2f}**)" if temp is not None else ""),
                 f"{bat['step_ms']:.2f}" if bat else "—",
                 f"{q['step_vmap_over_batched']:.2f}" if bat else "—",
                 f"{man['bwd_over_fwd']:.2f} / {bas['bwd_over_fwd']:.2f}",
                 f"{man['compile_s']:.2f} / {bas['compile_s']:.2f}",
                 f"{_mb(man['bytes_accessed'])} / {_mb(bas['bytes_accessed'])}",
                 _secondary(r)]
        cells += [f"{v[k]['step_ms']:.2f}" if k in v else "—" for k in extra]
        out.append("| " + " | ".join(cells) + " |")
    skipped = skipped_lines(result)
    if skipped:
        out += ["", "Optional columns absent: " + "; ".join(skipped) + "."]
    out += forward_markdown(result)
    out += _sections(result)
    out += ["", "| target | measured | limit | |", "| --- | --- | --- | --- |"]
    for t in result["targets"]:
        sign = "≥" if "GEMM" in t["target"] else "≤"
        out.append(f"| {t['target']} | {t['value']:.3f} | {sign} {t['limit']} | "
                   f"{'met' if t['ok'] else '**missed**'} |")
    return "\n".join(out) + "\n"

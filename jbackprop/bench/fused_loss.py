"""``jbackprop bench``, fused loss: MM + cross-entropy over a large vocabulary, memory and time.

The gradient of the mean loss with respect to the weights, the bias and the rows ``z`` (one
jit-compiled function: forward and backward), for ``rows`` tokens of width ``m`` and a
vocabulary of ``k`` classes, in two versions:

* ``manual``: ``jb.linear_cross_entropy`` (default blocks of 256 rows; its rules recompute
  each block's logits and never hold the rows × classes matrix);
* ``autodiff``: ``jax.grad`` of the pure-``jnp`` reference ``cross_entropy(z Wᵀ + b, y)``, which
  holds the full logits and their softmax (what a user would otherwise write).

Temporary memory is ``temp_size_in_bytes`` of XLA's ``memory_analysis()``; times are medians of
interleaved rounds (``harness.interleaved_medians``).
"""
from __future__ import annotations

import statistics
from typing import Callable

import jax
import jax.numpy as jnp

import jbackprop as jb
from jbackprop import reference
from jbackprop.bench import harness as bench_harness

TITLE = "fused MM + cross-entropy, forward + backward (grad w.r.t. W, b, z), float32:"
SHAPES = ((1024, 128, 16384),)                   # (rows, m, k): the logits are 64 MB
QUICK_SHAPES = ((256, 32, 2048),)
VERSIONS: dict[str, Callable] = {"manual": jb.linear_cross_entropy,
                                 "autodiff": reference.linear_cross_entropy}


def gradient_of(loss: Callable) -> Callable:
    """``(params, z, y) -> (loss, (params_bar, z_bar))`` of the mean loss."""
    return jax.value_and_grad(lambda p, z, y: jnp.mean(loss(p, z, y)), (0, 1))


def run_shape(rows: int, m: int, k: int, budget_s: float, repeat: int = 1) -> dict:
    """Compile and time both versions, interleaved; one record."""
    kw, kz, ky = jax.random.split(jax.random.PRNGKey(rows + k), 3)
    params = {"W": jax.random.normal(kw, (k, m), jnp.float32) / m ** 0.5,
              "b": jnp.zeros((k,), jnp.float32)}
    args = (params, jax.random.normal(kz, (rows, m), jnp.float32),
            jax.random.randint(ky, (rows,), 0, k))
    rec = {"rows": rows, "m": m, "k": k, "logits_bytes": 4 * rows * k, "versions": {}}
    calls, values = {}, {}
    for name, loss in VERSIONS.items():
        compiled, compile_s, temp = bench_harness.compile_timed(gradient_of(loss), *args)
        values[name] = compiled(*args)
        calls[name] = lambda c=compiled: c(*args)
        rec["versions"][name] = {"compile_s": compile_s, "temp_bytes": temp}
    rec["rel_diff_vs_autodiff"] = bench_harness._max_rel_diff(values["manual"],
                                                              values["autodiff"])
    runs = [bench_harness.interleaved_medians(calls, budget_s) for _ in range(repeat)]
    for name in calls:
        rec["versions"][name]["ms"] = 1e3 * statistics.median(r[name] for r in runs)
    v = rec["versions"]
    rec["time_manual_over_autodiff"] = v["manual"]["ms"] / v["autodiff"]["ms"]
    temps = [v[name]["temp_bytes"] for name in ("manual", "autodiff")]
    rec["temp_manual_over_autodiff"] = temps[0] / temps[1] if None not in temps else None
    return rec


def run(quick: bool = False, budget_s: float = 4.0, progress: Callable[[str], None] = print,
        repeat: int = 1) -> list[dict]:
    """The section: one record per shape."""
    out = []
    for rows, m, k in QUICK_SHAPES if quick else SHAPES:
        progress(f"fused MM + cross-entropy, {rows} rows, m = {m}, vocabulary {k}")
        out.append(run_shape(rows, m, k, budget_s, repeat))
    return out


def targets(records: list[dict]) -> list[dict]:
    """Temporary memory ≤ 0.5 × autodiff; time ≤ 1.0 × autodiff."""
    out = []
    for r in records:
        label = f"fused loss {r['rows']}×{r['k']}"
        if r["temp_manual_over_autodiff"] is not None:
            out.append(bench_harness.target(f"{label}: temp memory manual/autodiff",
                                            r["temp_manual_over_autodiff"], 0.5))
        out.append(bench_harness.target(f"{label}: time manual/autodiff",
                                        r["time_manual_over_autodiff"], 1.0))
    return out


def lines(records: list[dict]) -> list[str]:
    """The section as a Markdown table."""
    mb = lambda b: "?" if b is None else f"{b / 2 ** 20:.1f}"
    out = ["| rows × m → vocabulary | manual ms | autodiff ms | time manual/autodiff | "
           "temp MB manual / autodiff (ratio) | the logits MB |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in records:
        v, ratio = r["versions"], r["temp_manual_over_autodiff"]
        out.append(f"| {r['rows']} × {r['m']} → {r['k']} | {v['manual']['ms']:.1f} | "
                   f"{v['autodiff']['ms']:.1f} | **{r['time_manual_over_autodiff']:.2f}** | "
                   f"{mb(v['manual']['temp_bytes'])} / {mb(v['autodiff']['temp_bytes'])} "
                   f"(**{'?' if ratio is None else f'{ratio:.2f}'}**) | "
                   f"{mb(r['logits_bytes'])} |")
    return out


if __name__ == "__main__":
    import sys
    sys.exit(bench_harness.section_main(sys.modules[__name__], "fused_loss"))

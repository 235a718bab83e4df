"""``jbackprop bench``, attention: forward + backward of one attention, memory and time.

For ``d = 64`` and sequence lengths ``n = m`` of 512 to 4096 (128 and 256 with ``--quick``), the
gradient of ``⟨Ō, attention(q, k, v)⟩`` with respect to ``q``, ``k`` and ``v`` (one jit-compiled
function: the forward and the backward) in three versions:

* ``manual``: ``jb.attention``, whose hand-written backward keeps O(n·d) residuals and works by
  blocks of 128 query rows;
* ``autodiff``: ``jax.grad`` of the pure-``jnp`` reference ``softmax(q kᵀ/√d) v``, which keeps
  the ``n × n`` probabilities (the baseline);
* ``jax.nn.dot_product_attention``: what a user would otherwise call (XLA's implementation on
  CPU), differentiated by ``jax.grad``.

Temporary memory is ``temp_size_in_bytes`` of XLA's ``memory_analysis()``; times are medians of
interleaved rounds (``harness.interleaved_medians``). ``rel_diff_vs_autodiff`` checks that the
versions compute the same gradients.
"""
from __future__ import annotations

import statistics
from typing import Callable

import jax
import jax.numpy as jnp

import jbackprop as jb
from jbackprop import reference
from jbackprop.bench import harness as bench_harness

TITLE = "attention, forward + backward (grad w.r.t. q, k, v), d = 64, float32:"
LENGTHS, QUICK_LENGTHS, WIDTH = (512, 1024, 2048, 4096), (128, 256), 64


def _dot_product_attention(q, k, v):
    """``jax.nn.dot_product_attention`` on one sequence (its layout is (batch, T, heads, d))."""
    return jax.nn.dot_product_attention(q[None, :, None], k[None, :, None], v[None, :, None])[0, :, 0]


VERSIONS: dict[str, Callable] = {"manual": jb.attention, "autodiff": reference.attention,
                                 "jax.nn.dot_product_attention": _dot_product_attention}


def gradient_of(attention: Callable) -> Callable:
    """``(q, k, v, o_bar) -> (q̄, k̄, v̄)``: the forward and the backward of one attention."""
    return jax.grad(lambda q, k, v, o_bar: jnp.vdot(attention(q, k, v), o_bar), (0, 1, 2))


def run_length(n: int, budget_s: float, repeat: int = 1) -> dict:
    """Compile and time the three versions at ``n = m``, interleaved; one record."""
    keys = jax.random.split(jax.random.PRNGKey(n), 4)
    args = tuple(jax.random.normal(key, (n, WIDTH), jnp.float32) for key in keys)
    rec = {"n": n, "d": WIDTH, "versions": {}}
    calls, values = {}, {}
    for name, attention in VERSIONS.items():
        compiled, compile_s, temp = bench_harness.compile_timed(gradient_of(attention), *args)
        values[name] = compiled(*args)
        calls[name] = lambda c=compiled: c(*args)
        rec["versions"][name] = {"compile_s": compile_s, "temp_bytes": temp}
    for name, value in values.items():
        rec["versions"][name]["rel_diff_vs_autodiff"] = \
            bench_harness._max_rel_diff(value, values["autodiff"])
    runs = [bench_harness.interleaved_medians(calls, budget_s) for _ in range(repeat)]
    for name in calls:
        rec["versions"][name]["ms"] = 1e3 * statistics.median(r[name] for r in runs)
    v = rec["versions"]
    rec["time_manual_over_autodiff"] = v["manual"]["ms"] / v["autodiff"]["ms"]
    rec["time_manual_over_dot_product_attention"] = \
        v["manual"]["ms"] / v["jax.nn.dot_product_attention"]["ms"]
    temps = [v[name]["temp_bytes"] for name in ("manual", "autodiff")]
    rec["temp_manual_over_autodiff"] = temps[0] / temps[1] if None not in temps else None
    rec["n_by_n_bytes"] = 4 * n * n                   # one float32 n × n matrix, for scale
    return rec


def run(quick: bool = False, budget_s: float = 4.0, progress: Callable[[str], None] = print,
        repeat: int = 1) -> list[dict]:
    """The attention section: one record per sequence length."""
    out = []
    for n in QUICK_LENGTHS if quick else LENGTHS:
        progress(f"attention, n = m = {n}, d = {WIDTH}")
        out.append(run_length(n, budget_s, repeat))
    return out


def targets(records: list[dict]) -> list[dict]:
    """Memory ≤ 0.25 × autodiff at n = 2048; time ≤ 1.2 × autodiff at every length."""
    out = []
    for r in records:
        if r["n"] == 2048 and r["temp_manual_over_autodiff"] is not None:
            out.append(bench_harness.target("attention n=2048: temp memory manual/autodiff",
                                            r["temp_manual_over_autodiff"], 0.25))
        out.append(bench_harness.target(f"attention n={r['n']}: time manual/autodiff",
                                        r["time_manual_over_autodiff"], 1.2))
    return out


def lines(records: list[dict]) -> list[str]:
    """The section as a Markdown table."""
    out = ["| n = m (d = 64) | manual ms | autodiff ms | dot_product_attention ms | time manual/"
           "autodiff | temp MB manual / autodiff (ratio) | one n×n matrix MB |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        v = r["versions"]
        mb = lambda b: "?" if b is None else f"{b / 2 ** 20:.1f}"
        ratio = r["temp_manual_over_autodiff"]
        out.append(f"| {r['n']} | {v['manual']['ms']:.2f} | {v['autodiff']['ms']:.2f} | "
                   f"{v['jax.nn.dot_product_attention']['ms']:.2f} | "
                   f"**{r['time_manual_over_autodiff']:.2f}** | {mb(v['manual']['temp_bytes'])} / "
                   f"{mb(v['autodiff']['temp_bytes'])} "
                   f"(**{'?' if ratio is None else f'{ratio:.2f}'}**) | "
                   f"{r['n_by_n_bytes'] / 2 ** 20:.1f} |")
    return out


def plot(records: list[dict], path: str) -> None:
    """Temporary memory against n, manual (linear) and autodiff (quadratic), log-log."""
    from jbackprop._optional import import_optional
    import_optional("matplotlib", "the attention memory chart")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ns = [r["n"] for r in records]
    for name, style in (("manual", "o-"), ("autodiff", "s--"),
                        ("jax.nn.dot_product_attention", "^:")):
        ax.loglog(ns, [r["versions"][name]["temp_bytes"] / 2 ** 20 for r in records], style,
                  label=name)
    ax.loglog(ns, [r["n_by_n_bytes"] / 2 ** 20 for r in records], "k-", lw=0.5,
              label="one n×n float32 matrix")
    ax.set_xlabel("sequence length n (= m), d = 64")
    ax.set_ylabel("temporary memory, MB")
    ax.set_title("attention, forward + backward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    import sys
    sys.exit(bench_harness.section_main(sys.modules[__name__], "attention"))

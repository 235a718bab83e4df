"""``jbackprop bench`` and its grid: the suite runs end to end and compares like with like.

No timing is asserted here (timings live in the benchmark's own output, not in unit tests):
these tests check that every configuration's manual and autodiff versions compute the same
mathematics, that the harness measures what it says, and that the command writes its table,
JSON and chart. The optional PyTorch / Equinox columns are tested in test_bench_external.py.
"""
import json

import chex
import jax
import jax.numpy as jnp
import pytest

from jbackprop import cli
from jbackprop.bench import harness as bench, models as bench_models


@pytest.mark.parametrize("config", bench_models.CONFIGS, ids=lambda c: c.name)
def test_versions_compute_the_same_loss_and_gradient(config):
    """Manual (hand-written backward) and autodiff (``jax.grad`` of the reference) versions of
    each configuration, and the batched one, agree: the benchmark compares the same maths."""
    p = config.build(True)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), p.params)
    x = p.x.astype(jnp.float64)
    ref_value, ref_grad = jax.value_and_grad(p.losses["autodiff"])(params, x, p.y)
    for version, loss in p.losses.items():
        value, grad = jax.jit(jax.value_and_grad(loss))(params, x, p.y)
        chex.assert_trees_all_close(value, ref_value, rtol=1e-12, atol=0)
        chex.assert_trees_all_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_matmul_flops_of_the_large_mlp():
    """6·B·(weights) per step, the count used for the GEMM-fraction target (closed form)."""
    config = bench_models.select(["mlp-large"])[0]
    p = config.build(False)
    weights = 784 * 1024 + 3 * 1024 * 1024 + 1024 * 10
    assert p.matmul_flops == 6 * 256 * weights
    assert p.x.shape == (256, 784) and len(p.params) == 5


def test_select_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown configuration.*'nope'"):
        bench_models.select(["mlp-large", "nope"])


def test_interleaved_medians_interleave_and_take_medians():
    calls = []
    medians = bench.interleaved_medians(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        budget_s=0.0, min_rounds=5, max_rounds=5)
    assert calls[:4] == ["a", "b", "a", "b"]           # two warm-up rounds,
    assert len(calls) == 14 and all(sorted(calls[i:i + 2]) == ["a", "b"]   # then five rounds,
                                    for i in range(4, 14, 2))              # each a and b once
    assert set(medians) == {"a", "b"} and all(m >= 0 for m in medians.values())


def test_compile_timed_reports_temporary_memory():
    """An executable that needs a scratch array reports it: (n, n) float64 intermediate, scalar
    out. (XLA's CPU client has ``memory_analysis()``, so CI sees a number, not None.)"""
    n = 256
    _, seconds, temp = bench.compile_timed(lambda a: jnp.sum(jnp.sin(a @ a) @ a), jnp.ones((n, n)))
    assert seconds > 0
    assert temp is not None
    assert temp >= n * n * 8


def test_cli_bench_quick_writes_table_json_and_chart(tmp_path, capsys):
    out, png, md = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    code = cli.main(["bench", "--quick", "--config", "mlp-small", "layernorm-net",
                     "--repeat", "2", "--no-external", "--json", str(out), "--plot", str(png), "--markdown", str(md)])
    assert code == 0
    text = capsys.readouterr().out
    assert "manual ms" in text and "autodiff ms" in text and "targets:" in text
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["configs"]] == ["mlp-small", "layernorm-net"]
    assert result["gemm"]["gflops"] > 0
    for r in result["configs"]:
        assert set(r["versions"]) == {"manual", "autodiff", "manual, batched"}
        assert len(r["step_ratio_runs"]) == 2
        for v in r["versions"].values():
            assert v["step_ms"] > 0 and v["fwd_ms"] > 0 and v["grad_ms"] > 0
            assert v["compile_s"] > 0
            assert v["grad_rel_diff_vs_autodiff"] < 1e-5
    names = [t["target"] for t in result["targets"]]
    assert "mlp-small: step manual/autodiff" in names
    assert "layernorm-net: temp memory manual/autodiff" in names
    assert set(result["compile_vs_depth"]) == {"2", "8"}
    assert png.stat().st_size > 10_000
    table = md.read_text()
    assert "| `layernorm-net`:" in table and "| target | measured | limit |" in table
    assert table.count("\n| mlp-small: ") + table.count("\n| layernorm-net: ") == len(names)


def test_cli_bench_unknown_config_exits_2(capsys):
    assert cli.main(["bench", "--quick", "--config", "nope", "--no-compile-depth"]) == 2
    assert "unknown configuration" in capsys.readouterr().err

"""``jbackprop bench`` and its grid: the suite runs end to end and compares like with like.

No timing is asserted here (timings live in the benchmark's own output, not in unit tests):
these tests check that every configuration's manual and autodiff versions (and, for the
convolutions, the ``lax.conv`` baseline) compute the same mathematics, that the harness
measures what it says, and that the command writes its table, JSON and chart. The optional
PyTorch / Equinox / Flax columns are tested in test_bench_external.py.
"""
import json
import re

import chex
import jax
import jax.numpy as jnp
import pytest

from jbackprop import cli
from jbackprop.bench import forward as bench_forward, harness as bench, models as bench_models
from jbackprop.bench import report as bench_report


@pytest.mark.parametrize("config", bench_models.CONFIGS, ids=lambda c: c.name)
def test_versions_compute_the_same_loss_and_gradient(config):
    """Manual (hand-written backward) and autodiff (``jax.grad`` of the reference) versions of
    each configuration, and the batched one, agree: the benchmark compares the same maths."""
    p = config.build(True)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), p.params)
    x = p.x.astype(jnp.float64) if jnp.issubdtype(p.x.dtype, jnp.floating) else p.x   # ids
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
    assert "manual ms" in text and "base ms" in text and "targets:" in text
    assert re.search(r"^mlp-small +autodiff ", text, re.M)   # the dense models' baseline
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
    assert [(r["config"], r["mode"]) for r in result["forward"]] == \
        [("mlp-small", "jvp"), ("mlp-small", "hvp"), ("layernorm-net", "jvp")]
    assert "mlp-small: hvp time manual/autodiff" in names and "forward mode:" in text
    assert png.stat().st_size > 10_000
    table = md.read_text()
    assert "| `layernorm-net`:" in table and "| target | measured | limit |" in table
    assert "| `mlp-small` | hvp |" in table and "| `layernorm-net` | jvp |" in table
    assert table.count("\n| mlp-small: ") + table.count("\n| layernorm-net: ") == len(names)


def test_cli_bench_unknown_config_exits_2(capsys):
    assert cli.main(["bench", "--quick", "--config", "nope", "--no-compile-depth"]) == 2
    assert "unknown configuration" in capsys.readouterr().err


CONV_CONFIGS = [c for c in bench_models.CONFIGS if c.name.startswith("conv")]


@pytest.mark.parametrize("config", CONV_CONFIGS, ids=lambda c: c.name)
def test_convolutions_are_compared_with_lax_conv(config):
    """Every convolutional configuration has the ``lax.conv`` version (``jax.grad`` of the net
    written with ``lax.conv_general_dilated`` on the NHWC batch), names it as its baseline, and
    it computes jbackprop's loss and gradient: float64, the hand-written backward against
    ``jax.grad`` of lax.conv, to round-off."""
    p = config.build(True)
    assert p.baseline == "lax.conv" and {"manual", "autodiff", "lax.conv"} <= set(p.losses)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), p.params)
    x = p.x.astype(jnp.float64) if jnp.issubdtype(p.x.dtype, jnp.floating) else p.x   # ids
    value, grad = jax.jit(jax.value_and_grad(p.losses["lax.conv"]))(params, x, p.y)
    man_value, man_grad = jax.jit(jax.value_and_grad(p.losses["manual"]))(params, x, p.y)
    assert jnp.abs(grad[0]["w"]).max() > 1e-3                 # a gradient, not zeros
    chex.assert_trees_all_close(man_value, value, rtol=1e-12, atol=0)
    chex.assert_trees_all_close(man_grad, grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n, k", [(1, 3), (1, 5), (2, 3), (2, 5)])
def test_lax_conv_has_jbackprop_padding_and_layout(n, k):
    """``lax_conv`` (``padding="SAME"``, NHWC / HWIO) is ``jb.conv1d`` / ``jb.conv2d`` (ℓ zeros
    on each side, channels last, kernel ``(*K, C, C')``) on a batch, for k = 3 and 5."""
    import jbackprop as jb
    keys = jax.random.split(jax.random.PRNGKey(n * 10 + k), 3)
    spatial = (9, 7)[:n]
    z = jax.random.normal(keys[0], (4, *spatial, 3), jnp.float64)
    p = {"w": jax.random.normal(keys[1], (k,) * n + (3, 5), jnp.float64),
         "b": jax.random.normal(keys[2], (5,), jnp.float64)}
    expected = (jb.conv1d if n == 1 else jb.conv2d)(p, z)
    chex.assert_trees_all_close(bench_models.lax_conv(p, z), expected, rtol=1e-12, atol=1e-12)


def test_cli_bench_conv_reports_the_lax_conv_baseline(tmp_path, capsys):
    """A convolutional configuration's record, table and Markdown show manual against
    ``lax.conv`` as the headline and the shifted-slice reference as a labelled secondary
    figure; its targets are against ``lax.conv``. (Structure only: no timing is asserted.)"""
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = cli.main(["bench", "--quick", "--config", "conv2d-pair", "--budget", "0",
                     "--no-external", "--no-compile-depth", "--json", str(out),
                     "--markdown", str(md)])
    assert code == 0
    text = capsys.readouterr().out
    assert "lax.conv" in text and "slice-ref" in text
    (r,) = json.loads(out.read_text())["configs"]
    assert r["baseline"] == "lax.conv"
    assert set(r["versions"]) == {"manual", "autodiff", "lax.conv"}
    for v in r["versions"].values():
        assert v["step_ms"] > 0 and v["temp_bytes"] is not None
        assert v["grad_rel_diff_vs_autodiff"] < 1e-5
    assert r["step_ratio_runs"] == [pytest.approx(r["versions"]["manual"]["step_ms"]
                                                  / r["versions"]["lax.conv"]["step_ms"])]
    names = [t["target"] for t in json.loads(out.read_text())["targets"]]
    assert names == ["conv2d-pair: step manual/lax.conv",
                     "conv2d-pair: temp memory manual/lax.conv"]
    row = next(line for line in md.read_text().splitlines() if line.startswith("| `conv2d-pair`"))
    assert "`jax.grad` of `lax.conv_general_dilated`" in row


def test_forward_mode_section_runs_and_is_well_formed():
    """The forward-mode section (``jax.jvp`` on the layer-norm net, Hessian-vector products on
    ResNet-S; the MLP's rows are in the CLI test above), tiny sizes: every version is compiled,
    timed and checked against autodiff of the reference; ratios are positive and finite. (No
    timing is asserted: only that the records are well formed and the versions agree.)"""
    import math
    records = bench_forward.run(["resnet-s", "layernorm-net", "conv2d-pair"],
                                quick=True, budget_s=0.0, progress=lambda s: None)
    assert [(r["config"], r["mode"]) for r in records] == \
        [("resnet-s", "hvp"), ("layernorm-net", "jvp")]        # none for conv2d-pair
    for r in records:
        expected = {"manual", "autodiff"} | ({"manual, rev-over-rev"} if r["mode"] == "hvp"
                                             else set())
        assert set(r["versions"]) == expected and r["baseline"] == "autodiff"
        for v in r["versions"].values():
            assert v["ms"] > 0 and v["compile_s"] > 0 and v["temp_bytes"] is not None
            assert v["rel_diff_vs_autodiff"] < 1e-4          # the same jvp / the same H v
        keys = ["time_manual_over_autodiff", "temp_manual_over_autodiff"]
        if r["mode"] == "hvp":
            keys += ["time_manual_over_rev_over_rev", "temp_manual_over_rev_over_rev"]
        for k in keys:
            assert math.isfinite(r[k]) and r[k] > 0, (r["config"], r["mode"], k, r[k])
        assert len(r["time_ratio_runs"]) == 1
    names = [t["target"] for t in bench_forward.targets(records)]
    assert "layernorm-net: jvp time manual/autodiff" in names
    assert "resnet-s: hvp temp memory manual/autodiff" in names
    lines = bench_report.forward_lines({"forward": records})
    assert len(lines) == 4 + len(records) and lines[-1].startswith("layernorm-net  jvp")


def test_hvp_versions_agree_in_float64():
    """Forward over reverse (jbackprop, and the reference) and reverse over reverse (jbackprop)
    give the same H v, and the hand-written jvp the reference's: float64, to round-off."""
    p = bench_models.select(["mlp-small"])[0].build(True)
    p = p._replace(params=jax.tree.map(lambda a: a.astype(jnp.float64), p.params),
                   x=p.x.astype(jnp.float64))
    modes = bench_forward.versions(p)
    for mode, fns in modes.items():
        ref = jax.jit(fns["autodiff"][0])(*fns["autodiff"][1])
        for version, (fn, args) in fns.items():
            chex.assert_trees_all_close(jax.jit(fn)(*args), ref, rtol=1e-10, atol=1e-12)


def test_attention_section_quick():
    """The attention section at two lengths (the second blocked): the three versions compute the
    same gradients; records, targets and the Markdown lines have their fields."""
    from jbackprop.bench import attention as bench_attention
    records = bench_attention.run(quick=True, budget_s=0.0, progress=lambda s: None)
    assert [r["n"] for r in records] == list(bench_attention.QUICK_LENGTHS)
    for r in records:
        assert set(r["versions"]) == set(bench_attention.VERSIONS)
        for v in r["versions"].values():
            assert v["ms"] > 0 and v["rel_diff_vs_autodiff"] < 1e-4
    names = [t["target"] for t in bench_attention.targets(records)]
    assert names == [f"attention n={n}: time manual/autodiff" for n in bench_attention.QUICK_LENGTHS]
    assert len(bench_attention.lines(records)) == 2 + len(records)


def test_fused_loss_section_quick():
    """The fused-loss section at its quick shape: both versions compute the same loss and
    gradients; the fused one's temporary memory is below the unfused one's; records, targets
    and lines have their fields; ``section_main`` writes the JSON."""
    import json
    from jbackprop.bench import fused_loss, harness
    records = fused_loss.run(quick=True, budget_s=0.0, progress=lambda s: None)
    assert [(r["rows"], r["m"], r["k"]) for r in records] == list(fused_loss.QUICK_SHAPES)
    r = records[0]
    assert r["rel_diff_vs_autodiff"] < 1e-4 and all(v["ms"] > 0 for v in r["versions"].values())
    assert r["temp_manual_over_autodiff"] < 1
    assert [t["target"] for t in fused_loss.targets(records)] == [
        "fused loss 256×2048: temp memory manual/autodiff", "fused loss 256×2048: time manual/autodiff"]
    assert len(fused_loss.lines(records)) == 3


def test_section_main_writes_json(tmp_path, capsys):
    """``python -m jbackprop.bench.fused_loss --quick``: the table on stdout and the JSON."""
    from jbackprop.bench import fused_loss, harness
    path = tmp_path / "fused.json"
    assert harness.section_main(fused_loss, "fused_loss",
                                ["--quick", "--budget", "0", "--json", str(path)]) == 0
    saved = json.loads(path.read_text())
    assert saved["fused_loss"][0]["k"] == 2048 and saved["targets"]
    assert "| 256 × 32 → 2048 |" in capsys.readouterr().out

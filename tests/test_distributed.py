"""jbackprop.train.distributed: data-parallel training on 4 devices equals 1 device, model-parallel MLP
gradients equal 1 device and autodiff of the reference, clear errors, ``jbackprop train
--devices 4`` in one process and across two (``jax.distributed.initialize``), resume.

The pytest process has started JAX with one CPU device, so the 4-device checks run in fresh
processes with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``, started together by
``test_on_four_devices``: the script ``tests/distributed_4_devices.py`` (it prints its
measurements as JSON; the assertions are here), the command line, and the command line as two
processes of 2 devices each.

Tolerances. The 4-device gradient is a sum of 4 per-device partial sums, all-reduced; the
1-device one sums the same 32 terms in another order. So the two runs differ by round-off
only: a few ulps per step, carried through 50 Adam steps. Measured: 1.2e-7 (losses) and 2.2e-7
(parameters, relative to each leaf's largest entry) in float32, 3e-16 in float64; the bounds are
1e-5 in float32 (as for the manual/autodiff training comparison in ``test_train.py``) and
1e-12 in float64, where a real difference (an unscaled or missing all-reduce, a batch split
wrongly) would show at order 1.
"""
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import cli
from jbackprop.train import distributed as dist, trainer
from jbackprop.train import Config

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "distributed_4_devices.py"
XOR = ["--dataset", "xor", "--width", "16", "--epochs", "2", "--batch-size", "32", "--lr", "1e-2"]
F32, F64 = 1e-5, 1e-12


def _env(devices=4):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_on_four_devices(tmp_path):
    """One test, so that ``pytest -n 2`` starts the 4-device processes once: the checks are the
    functions below, each named in a failure's traceback."""
    facts, done = _run_on_four_devices(tmp_path)
    for dtype, tol in (("float32", F32), ("float64", F64)):
        _check_data_parallel(facts["data_parallel"][dtype], dtype, tol)
    _check_step_on_a_sharded_batch(facts["step"])
    for r in facts["model_parallel"]:
        _check_model_parallel_gradients(r)
    for dtype, tol in (("float32", F32), ("float64", F64)):
        _check_model_parallel_training(facts["model_parallel_training"][dtype], tol)
    _check_errors(facts["errors"])
    _check_cli_run_equals_one_device(done["one"], tmp_path / "one", tmp_path / "one-device")
    _check_cli_run_equals_one_device(done["model"], tmp_path / "model", tmp_path / "model-one-device")
    _check_two_processes_train_like_one(done, tmp_path)


def _run_on_four_devices(out):
    """Start together: the 4-device script, ``jbackprop train --devices 4`` in one process, and
    the same command as 2 processes of 2 devices joined by ``jax.distributed.initialize``."""
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    train = [*XOR, "--devices", "4", "--no-progress", "--out"]
    port = _free_port()
    procs = {"script": subprocess.Popen([sys.executable, str(SCRIPT)], env=_env(), **pipes),
             "one": subprocess.Popen([sys.executable, "-m", "jbackprop.cli", "train", *train,
                                      str(out / "one")], cwd=str(out), env=_env(), **pipes),
             "model": subprocess.Popen([sys.executable, "-m", "jbackprop.cli", "train",
                                        "--model-parallel", "2", *train, str(out / "model")],
                                       cwd=str(out), env=_env(), **pipes)}
    for i in (0, 1):   # data × model across the two processes: each process one row of the mesh
        procs[i] = subprocess.Popen([sys.executable, str(SCRIPT), "--process", str(i), str(port),
                                     "train", "--model-parallel", "2", *train, str(out / str(i))],
                                    env=_env(devices=2), **pipes)
    done = {}
    for name, p in procs.items():
        o, e = p.communicate(timeout=600)
        done[name] = (p.returncode, o, e)
    code, s_out, s_err = done.pop("script")
    assert code == 0, s_err[-3000:]
    facts = json.loads(s_out.strip().splitlines()[-1])
    assert facts["device_count"] == 4
    return facts, done


def _check_data_parallel(r, dtype, tol):
    """50 steps of ``data_parallel_epoch`` on 4 devices against ``train_epoch`` on 1."""
    assert r["steps"] == 50
    assert r["loss_rel"] <= tol and r["param_rel"] <= tol, r
    first, last = r["loss_first_last"]
    assert last < 0.5 * first                         # it trained
    assert r["batch_spec"] == ["data", None]          # inside the step: rows split over 4
    assert r["batch_shard_shape"] == [8, 64]          # 32 / 4 examples per device
    assert r["params_replicated"] and r["params_devices"] == [4]
    if dtype == "float32":
        assert r["all_reduces"] >= 1                  # XLA's own gradient reduction


def _check_step_on_a_sharded_batch(r):
    assert r["xb_spec"] == ["data", None]
    assert r["xb_shards"] == [[8, 64]] * 4 and r["xb_shard_devices"] == 4
    assert r["loss_rel"] <= F64 and r["param_rel"] <= F64, r


def _check_model_parallel_training(r, tol):
    """50 Adam steps on a 2 × 2 (data × model) mesh equal one device's, to round-off (measured
    2e-7 in float32, 4e-16 in float64); the first layer's W and its Adam moment stay split
    over "model" (32 of 64 rows per device), and the loss went down."""
    assert r["steps"] == 50
    assert r["loss_rel"] < tol and r["param_rel"] < tol, r
    assert r["W0_spec"] == ["model", None] and r["mu_W0_spec"] == ["model", None]
    assert r["W0_shard_shape"] == [32, 64]
    assert r["loss_first_last"][1] < 0.5 * r["loss_first_last"][0]


def _check_model_parallel_gradients(r):
    """W split along its output dimension, the next layer's along its input dimension: the
    hand-written backward sees the sharded W, its gradients come out sharded the same way and
    equal the 1-device gradients and ``jax.grad`` of the pure-jnp reference (float64)."""
    m = r["mesh"]["model"]
    assert r["mesh"] == {"data": 4 // m, "model": m}
    rows, cols = ["model", None], [None, "model"]
    assert r["W_specs"] == r["grad_W_specs"] == [rows, cols, rows, cols]
    assert r["b_specs"] == [["model"], [None], ["model"], [None]]
    full = [[16, 8], [12, 16], [16, 12], [5, 16]]     # sizes 8 → 16 → 12 → 16 → 5
    split = [[a // m, b] if i % 2 == 0 else [a, b // m] for i, (a, b) in enumerate(full)]
    assert r["W_shards"] == r["grad_W_shards"] == split
    assert r["bwd_W_specs"] == [cols, rows, cols, rows]   # B[MM, ·] ran, last layer first
    assert r["rel_vs_one_device"] <= F64 and r["rel_vs_reference"] <= 1e-10, r


def _check_errors(e):
    assert "devices=5 but JAX sees 4 cpu device(s)" in e["too_many"]
    assert "xla_force_host_platform_device_count=5" in e["too_many"]
    assert "model=3 must divide devices=4" in e["model_not_dividing"]
    for name in ("epoch_batch", "shard_batch", "step_batch"):
        assert "batch_size=30 does not split evenly over devices=4" in e[name], name
    assert "layer 0 W has shape (10, 8)" in e["mlp_width"] and "multiple of 4" in e["mlp_width"]
    assert e["cli_code"] == 2 and "batch_size=30" in e["cli_stderr"]


def _check_cli_run_equals_one_device(done, folder, tmp_path):
    """``jbackprop train --devices 4`` (or ``--devices 4 --model-parallel 2``, a 2 × 2 data ×
    model mesh) end to end; the same run on 1 device gives the same losses and parameters; the
    4-device checkpoint (written whole) resumes on 1 device."""
    code, out, err = done
    assert code == 0, err[-3000:]
    assert "test accuracy" in out
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["devices"] == 4 and metrics["config"]["devices"] == 4
    one = dataclasses.replace(Config(**metrics["config"]), devices=1, model_parallel=1)
    m1 = trainer.fit(one, str(tmp_path), progress=False)
    for a, b in zip(metrics["epochs"], m1["epochs"]):
        for key in ("step_loss", "train_loss", "test_loss"):
            assert abs(a[key] - b[key]) <= F32 * abs(b[key]), (key, a[key], b[key])
    s4, _, _ = trainer.load_checkpoint(str(folder / trainer.CHECKPOINT))
    s1, _, _ = trainer.load_checkpoint(str(tmp_path / trainer.CHECKPOINT))
    for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=F32 * np.max(np.abs(b)))
    # a run may resume on another number of devices (the configurations differ only there)
    assert trainer.fit(one, str(folder), resume=True, progress=False)["devices"] == 1


def _check_two_processes_train_like_one(done, out):
    """Two processes of 2 CPU devices each, joined by ``jax.distributed.initialize`` as two
    hosts would be (collectives over TCP, gloo): ``jbackprop train --devices 4 --model-parallel
    2`` on the 4 global devices (a 2 × 2 mesh, the MLP split within each process, the batch
    across them) gives the same run as data parallel in one process."""
    for i in (0, 1):
        assert done[i][0] == 0, done[i][2][-3000:]
    single = json.loads((out / "one" / "metrics.json").read_text())["epochs"]
    runs = [json.loads((out / str(i) / "metrics.json").read_text())["epochs"] for i in (0, 1)]
    assert len(runs[0]) == len(single) == 2
    assert [e["train_loss"] for e in runs[0]] == [e["train_loss"] for e in runs[1]]
    for a, b in zip(runs[0], single):
        assert abs(a["train_loss"] - b["train_loss"]) <= F32 * abs(b["train_loss"]), (a, b)


def test_too_many_devices_is_a_clear_error(tmp_path, capsys):
    n = jax.device_count() + 1
    with pytest.raises(ValueError, match=f"devices={n} but JAX sees {n - 1}"):
        dist.make_mesh(n)
    out = tmp_path / "never"
    assert cli.main(["train", *XOR, "--devices", str(n), "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"devices={n}" in err and f"XLA_FLAGS=--xla_force_host_platform_device_count={n}" in err
    assert not out.exists()                           # refused before anything is written


@pytest.mark.parametrize("kwargs", [dict(devices=0), dict(devices=-2), dict(devices=1.5),
                                    dict(devices=True), dict(devices=1, model=0)])
def test_make_mesh_rejects_non_positive_integers(kwargs):
    with pytest.raises(ValueError, match="must be a positive integer"):
        dist.make_mesh(**kwargs)


def test_make_mesh_and_mlp_specs_on_one_device():
    mesh = dist.make_mesh(1)
    assert dict(mesh.shape) == {"data": 1, "model": 1} and mesh.axis_names == ("data", "model")
    with pytest.raises(ValueError, match="model=2 must divide devices=1"):
        dist.make_mesh(1, model=2)
    assert dist.check_batch_size(7, mesh) == 7
    P = jax.sharding.PartitionSpec
    params = jb.mlp_init(jax.random.PRNGKey(0), [4, 8, 8, 3])     # three layers: the last alone
    params[1].pop("b")
    assert dist.mlp_specs(params) == [{"W": P("model", None), "b": P("model")},
                                      {"W": P(None, "model")},
                                      {"W": P(), "b": P()}]
    with pytest.raises(ValueError, match="scalar"):
        dist.shard_batch(mesh, np.float32(1.0))


def test_resume_a_checkpoint_written_before_devices_existed(tmp_path, capsys):
    """Older checkpoints have no ``devices`` in their configuration: they still resume."""
    small = dict(dataset="xor", width=16, batch_size=16, input_noise=0.1)
    trainer.fit(Config(**small, epochs=1), str(tmp_path), progress=False)
    path = tmp_path / trainer.CHECKPOINT
    with np.load(path) as z:                          # rewrite its JSON metadata
        arrays = dict(z)
    meta = json.loads(arrays["__meta__"].tobytes())
    del meta["config"]["devices"]
    meta["config"]["epochs"] = 2                      # as if stopped after 1 of 2 epochs
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **arrays)
    assert cli.main(["train", "--resume", str(tmp_path), "--no-progress"]) == 0
    state, history, saved = trainer.load_checkpoint(str(path))
    assert int(state.epoch) == 2 and len(history) == 2 and saved["devices"] == 1

"""Every module inside ``jax.shard_map`` (default ``check_vma=True``): a batch split over 4 CPU
devices, parameters replicated, gradients equal to one device's and to the reference's; and the
same gradient under ``jax.jit`` on a mesh whose axis is ``AxisType.Explicit``.

The pytest process has started JAX with one CPU device, so the script
``tests/shard_map_4_devices.py`` runs in a fresh process with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` and prints its measurements as JSON; the
assertions are here. Tolerance: float64, where the 4-device sums differ from the 1-device ones
by the order of the additions only (measured ≤ 4e-15); a replicated parameter's cotangent that
was not summed over the devices, or summed twice, would be off by a factor of 4."""
import json
import os
import pathlib
import subprocess
import sys

from jbackprop.modules.registry import cases

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "shard_map_4_devices.py"


def _measure():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


# Not yet on an Explicit mesh (inside shard_map it passes): the fused loss, whose blocks of rows
# reshape the batch-sharded rows (jax asks for an out_sharding). docs/scaling.md says so.
NOT_YET_EXPLICIT = {"linear_cross_entropy"}


def test_every_module_inside_shard_map_and_on_an_explicit_mesh():
    """One test, so that ``pytest -n 2`` starts the 4-device process once; a failure lists every
    case that failed, with its measurements or its exception."""
    measured = _measure()
    names = [c.name for c in cases()]
    assert sorted(measured) == sorted(names)
    failed = {}
    for name in names:
        r = measured[name]
        explicit = name.split("(")[0].split("[")[0] not in NOT_YET_EXPLICIT
        if "error" in r or not (r["vs_one_device"] < 1e-12 and r["vs_reference"] < 1e-12) or (
                explicit and ("explicit_error" in r or not r["explicit_vs_one_device"] < 1e-12)):
            failed[name] = r
    assert not failed, "\n".join(f"{k}: {v}" for k, v in failed.items())

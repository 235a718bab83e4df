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

import pytest

from jbackprop.modules.registry import cases

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "shard_map_4_devices.py"


@pytest.fixture(scope="module")
def measured():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [c.name for c in cases()])
def test_module_inside_shard_map(measured, name):
    result = measured[name]
    assert "error" not in result, result.get("error")
    assert result["vs_one_device"] < 1e-12, result
    assert result["vs_reference"] < 1e-12, result


@pytest.mark.parametrize("name", [c.name for c in cases()])
def test_module_on_an_explicit_mesh(measured, name):
    result = measured[name]
    assert "explicit_error" not in result, result.get("explicit_error")
    assert result["explicit_vs_one_device"] < 1e-12, result

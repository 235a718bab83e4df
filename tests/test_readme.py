"""The README's Python example runs as written."""
import pathlib
import re

import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "no python block in README.md"
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    np.testing.assert_array_equal(namespace["z_bar"], [4.0, 0.0, 5.0, 0.0])
    assert namespace["grads"][0]["W"].shape == (128, 64)
    assert all(bool(jnp.all(jnp.isfinite(g["W"]))) for g in namespace["grads"])

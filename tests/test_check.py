import json

import jax
import jax.numpy as jnp

from jbackprop import check, cli
from jbackprop import reference as ref


def test_verify_passes_a_correct_module_and_names_leaves():
    import jbackprop as jb
    rows = check.verify("mm", jb.mm, ref.mm, ({"W": jnp.ones((3, 2)), "b": jnp.ones(3)},
                                              jnp.array([1.0, -2.0])))
    assert {r.leaf for r in rows} == {"params['W']", "params['b']", "z"}
    assert all(r.passed for r in rows)


def test_verify_flags_a_wrong_backward():
    """W instead of Wᵀ in B[MM, z]: the checker must fail it (a checker that cannot fail is a defect)."""
    @jax.custom_vjp
    def bad_mm(params, z):
        return params["W"] @ z

    bad_mm.defvjp(lambda p, z: (bad_mm(p, z), (p["W"], z)),
                  lambda res, v: ({"W": jnp.outer(v, res[1])}, res[0][: res[1].shape[0], :] @ v[:res[0].shape[1]]))
    p, z = {"W": jnp.arange(9.0).reshape(3, 3)}, jnp.array([1.0, -2.0, 0.5])
    rows = check.verify("bad_mm", bad_mm, lambda p, z: p["W"] @ z, (p, z))
    bad = [r for r in rows if not r.passed]
    assert [r.leaf for r in bad] == ["z"]
    assert bad[0].err_autodiff > 0.1 and bad[0].err_fd > 0.1


def test_cli_check_one_module(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert cli.main(["check", "--module", "layer_norm", "--dtype", "float64", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layer_norm_s" in printed and "0 failed" in printed
    rows = json.loads(out.read_text())
    assert rows and all(r["passed"] and r["dtype"] == "float64" for r in rows)


def test_cli_unknown_module_is_an_error(capsys):
    assert cli.main(["check", "--module", "no_such_module"]) == 2

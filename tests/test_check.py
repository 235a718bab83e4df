"""jbackprop.check: verify_vjp's report, the pytest helper and the CLI. The suite of broken
backwards that the checker must flag is in test_check_catches_mistakes.py."""
import json

import jax
import jax.numpy as jnp
import pytest

import jbackprop as jb
from jbackprop import cli
from jbackprop import reference as ref
from jbackprop.check import ALL_CHECKS, verify_vjp
from jbackprop.testing import assert_vjp_correct

P = {"W": jnp.arange(6.0).reshape(3, 2) / 3, "b": jnp.ones(3)}
Z = jnp.array([1.0, -2.0])


def test_report_of_a_correct_module():
    r = verify_vjp(jb.mm, P, Z, reference=ref.mm)
    assert r.passed and r.name == "mm" and r.dtype == "float64"
    assert [leaf.leaf for leaf in r.leaves] == ["params['W']", "params['b']", "z"]
    for leaf in r.leaves:
        assert leaf.autodiff.passed and leaf.finite_differences.passed and leaf.taylor.passed
    assert {c.key for c in r.checks} == set(ALL_CHECKS) - {"autodiff", "finite_differences", "taylor"}
    # float64 with no integer leaves: the precision budget and the integer check have nothing to do
    assert {c.key for c in r.checks if c.skipped} == {"precision", "integer_leaves"}
    # the forward saves W and z: 3·2 + 2 float64 numbers
    assert r.residual_bytes == 8 * (6 + 2) and any("params['W']" in s for s in r.residuals)
    assert "params['W']" in str(r)
    d = json.loads(r.to_json())
    assert d["passed"] and d["leaves"][2]["autodiff"]["passed"]


def test_taylor_rates_of_a_smooth_function():
    r = verify_vjp(jb.tanh, jnp.array([0.3, -1.2, 0.8]), reference=ref.tanh)
    t = r.leaves[0].taylor
    assert not t.exact and abs(t.rate1 - 1) < 0.1 and abs(t.rate2 - 2) < 0.1


def test_works_without_reference_and_with_a_separate_backward():
    r = verify_vjp(jb.mm, P, Z)  # finite differences, Taylor, adjoint, 2nd order: no reference
    assert r.passed and r.leaves[0].autodiff is None
    assert {c.key for c in r.checks if c.skipped} == {"precision", "integer_leaves"}
    r = verify_vjp(jb.mm, P, Z, reference=ref.mm, backward=jb.backward(jb.mm))
    assert r.passed and r.residual_bytes is None


def _planted(delta):
    """``jb.sigmoid``'s hand-written backward with a planted relative error ``delta``."""
    return lambda z, v: tuple(c * (1 + delta) for c in jb.backward(jb.sigmoid)(z, v))


# The parts judged at the working dtype's tolerance (Taylor and reverse-over-reverse run the
# backward in float64, where a 1e-6 mistake is visible whatever the working dtype).
WORKING_DTYPE_PARTS = ("autodiff", "finite_differences", "adjoint")


@pytest.mark.parametrize("dtype, delta, passes", [
    ("float32", 0.0, True),
    ("float32", 1e-6, True),     # ~16 float32 round-offs: not evidence of a mistake
    ("float32", 1e-3, False),    # far beyond float32 round-off: a mistake
    ("float64", 1e-6, False),    # the same 1e-6 is a mistake in float64
])
def test_tolerance_by_dtype_separates_round_off_from_mistakes(dtype, delta, passes):
    z = jnp.array([0.5, -1.0, 2.0], dtype)
    r = verify_vjp(jb.sigmoid, z, reference=ref.sigmoid, backward=_planted(delta),
                   checks=WORKING_DTYPE_PARTS)
    assert r.dtype == dtype
    assert r.passed is passes, r.failures()
    # the report measures the planted error, relative to |e_i| + the element's local scale
    # (for the sigmoid here, at most about 3 |e_i|): between δ/4 and δ, or round-off for δ = 0
    measured = r.leaves[0].autodiff.error
    eps = float(jnp.finfo(dtype).eps)
    assert delta / 4 - eps <= measured <= delta + 8 * eps


def test_assert_vjp_correct_message_names_leaf_index_values_and_tolerance():
    @jax.custom_vjp
    def bad_mm(params, z):
        return params["W"] @ z

    # B[MM, z](v) = W v instead of Wᵀ v (square W): a classic transpose mistake
    bad_mm.defvjp(lambda p, z: (bad_mm(p, z), (p["W"], z)),
                  lambda res, v: ({"W": jnp.outer(v, res[1])}, res[0] @ v))
    W = jnp.array([[1.0, 2.0], [0.0, 1.0]])
    assert_vjp_correct(jb.mm, {"W": W}, Z, reference=ref.mm)
    with pytest.raises(AssertionError, match=r"bad_mm: z vs autodiff: error .* > tol 1e-09; "
                                             r"worst at index \(\d,\): hand-written .*, expected"):
        assert_vjp_correct(bad_mm, {"W": W}, Z, reference=lambda p, z: p["W"] @ z)


def test_a_rule_redefined_on_the_same_object_is_seen_at_the_next_call():
    """The compiled pullbacks are cached by the function *and its current rules*: after
    ``f.defvjp(fwd, fixed_bwd)`` the checker sees the fixed rule, as ``jax.grad`` does."""
    @jax.custom_vjp
    def f(z):
        return jnp.tanh(z)
    fwd = lambda z: (jnp.tanh(z), jnp.tanh(z))
    f.defvjp(fwd, lambda t, v: (-(1 - t * t) * v,))                  # wrong sign
    z = jnp.array([0.3, -1.0, 2.0])
    assert not verify_vjp(f, z, reference=ref.tanh).passed
    f.defvjp(fwd, lambda t, v: ((1 - t * t) * v,))                   # fixed, same object
    r = verify_vjp(f, z, reference=ref.tanh)
    assert r.passed, "\n".join(r.failures())
    f.defvjp(fwd, lambda t, v: (-(1 - t * t) * v,))                  # and broken again
    assert not verify_vjp(f, z, reference=ref.tanh).passed


def test_the_contract_check_names_the_leaf_and_both_dtypes():
    @jax.custom_vjp
    def mm32(params, z):
        return params["W"] @ z
    mm32.defvjp(lambda p, z: (p["W"] @ z, (p["W"], z)),                # W_bar float64: BUG
                lambda res, v: ({"W": jnp.outer(v, res[1]).astype(jnp.float64)}, res[0].T @ v))
    args = ({"W": jnp.ones((2, 3), jnp.float32)}, jnp.ones(3, jnp.float32))
    r = verify_vjp(mm32, *args, reference=ref.mm)
    assert [c.name for c in r.checks if not c.passed] == ["contract (cotangent shapes and dtypes)"]
    assert "params['W']: cotangent (2, 3) float64, primal (2, 3) float32" in r.failures()[0]
    assert json.loads(r.to_json())["checks"][0]["passed"] is False
    assert verify_vjp(jb.mm, *args, reference=ref.mm).passed     # the library casts back


def _square(backward):
    @jax.custom_vjp
    def square(z):
        return z * z
    square.defvjp(lambda z: (z * z, z), lambda z, v: (backward(z) * v,))
    return square


def test_a_smooth_point_is_not_a_kink():
    """z² at 0: its one-sided differences differ by 2h, but the gap halves with the step, so it
    is smooth and checked; a derivative wrong only at 0 is caught with no reference at all."""
    z = jnp.array([0.0, 1.0, -2.0])
    r = verify_vjp(_square(lambda z: 2 * z), z)
    assert r.passed and r.leaves[0].finite_differences.note == ""
    r = verify_vjp(_square(lambda z: jnp.where(z == 0, 1.0, 2 * z)), z)
    assert not r.passed
    fd = r.leaves[0].finite_differences
    assert not fd.passed and fd.worst_index == (0,) and fd.expected == 0.0
    # ReLU: its kink is left out; points within the top step h₀ ≈ 6e-6 of it are checked at a
    # smaller step of the ladder, where the differences agree
    r = verify_vjp(jb.relu, jnp.array([0.0, 1.0, -2.0, 3e-6, -2e-6]), reference=ref.relu)
    assert r.passed and r.leaves[0].finite_differences.note == "1 kink(s) left out"


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown checks"):
        verify_vjp(jb.relu, jnp.ones(2), checks=("autodiff", "nope"))
    with pytest.raises(ValueError, match="no floating-point argument"):
        verify_vjp(lambda y: y * 2, jnp.ones(2, jnp.int32))


@pytest.mark.parametrize("check", ALL_CHECKS)
def test_each_check_runs_alone(check):
    """``checks=(name,)`` runs that part and no other."""
    r = verify_vjp(jb.tanh, jnp.array([0.3, -1.2]), reference=ref.tanh, checks=(check,))
    leaf_parts = {p for p in ("autodiff", "finite_differences", "taylor")
                  if getattr(r.leaves[0], p) is not None}
    whole = {c.key for c in r.checks}
    assert leaf_parts | whole == {check} and r.passed


def test_cli_check_one_module(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert cli.main(["check", "--module", "layer_norm_s[7", "--dtype", "float64", "--jobs", "1",
                     "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layer_norm_s[7x5]" in printed and "Taylor rate" in printed and "0 failed" in printed
    reports = json.loads(out.read_text())
    assert [r["mode"] for r in reports] == ["VJP", "JVP"]          # both modes of the case
    assert all(r["passed"] and r["dtype"] == "float64" for r in reports)


def test_cli_unknown_module_is_an_error(capsys):
    assert cli.main(["check", "--module", "no_such_module", "--jobs", "1"]) == 2


def test_cli_train_xor(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "xor", "--width", "16", "--epochs", "2",
                     "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and str(out / "metrics.json") in printed
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0  # already done: no-op
    assert cli.main(["train", "--dataset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert cli.main(["train", "--resume", str(tmp_path / "nothing-here")]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err

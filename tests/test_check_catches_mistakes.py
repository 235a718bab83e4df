"""The checker fails wrong backwards and passes right ones.

Each mistake (in ``planted.py``) is a realistic bug in a hand-written backward, written as its
own small ``jax.custom_vjp`` the way the library's modules are written (forward, ``_fwd``
saving residuals, ``_bwd``, ``defvjp``), next to the correct pure-jnp reference. For each one the
tests assert that ``jbackprop.check.verify_vjp`` fails it, and *which* individual checks flag
it (``EXPECTED``), so that this file documents what each check catches. The table "What each
check catches" in ``docs/verifying.md`` is ``EXPECTED`` written out (a test compares them).

Finally every correct module of the library passes, including ReLU at an input with an exact
zero: the checker is shown both to pass right and to fail wrong.

Writing this file found three checker bugs (Taylor and the reference-free adjoint test at an
exact kink, and a jit-only failure crashing ``verify_vjp``); the tests that pinned them now pass.
"""
from __future__ import annotations

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from jbackprop.check import ALL_CHECKS, verify_vjp
from jbackprop.testing import assert_vjp_correct
from planted import (BETA, CE_ARGS, CLIP_ARGS, CONV_ARGS, CUBE_ARGS, LN_ARGS, MM_ARGS,
                     OFFSET_LN_ARGS, RES_ARGS, SCALED_MM_ARGS, SIGMOID_ARGS, SOFTPLUS_ARGS,
                     TANH32_ARGS, TANH_ARGS, batch_ce_missing_mean, batch_ce_reference,
                     conv1d_s_off_by_one, cube_abs, cube_reference, kink_at, layer_norm_s_fwd_eps,
                     layer_norm_s_no_xhat_term, layer_norm_s_one_pass, mm_clip_1, mm_clip_3,
                     mm_clip_10, mm_no_transpose, mm_per_example, mm_per_example_data_first, n,
                     relu_mask_ge, residual_no_skip, scaled_mm, scaled_mm_backward, sigmoid_naive,
                     sigmoid_stop_gradient, softplus_forgets_beta, tanh_float64_cotangent,
                     tanh_noisy, tanh_python_if, tanh_rescaled, tanh_wrong_sign)

P = functools.partial
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "verifying.md"

def flagged(report) -> set[str]:
    """The checks (names as in ``ALL_CHECKS``) that failed in ``report``."""
    out = set()
    for leaf in report.leaves:
        for what in ("autodiff", "finite_differences", "taylor"):
            part = getattr(leaf, what)
            if part is not None and not part.passed:
                out.add(what)
    for c in report.checks:
        if not c.passed:
            out.add(c.key)
    assert out <= set(ALL_CHECKS)
    return out


def failed_leaves(report) -> list[str]:
    return [leaf.leaf for leaf in report.leaves if not leaf.passed]


def check(report, name):
    """The whole-function check ``name`` (as in ``ALL_CHECKS``) of ``report``."""
    return next(c for c in report.checks if c.key == name)




# ============================================================================================
# Expected results: which checks flag each mistake (the table in docs/verifying.md)
# ============================================================================================
# A wrong first derivative. (Reverse-over-reverse checks the backward's own derivative against
# finite differences of ⟨w, B_x(v)⟩, so it flags a wrong *second* derivative — mistake (k).)
WRONG_DERIVATIVE = {"autodiff", "finite_differences", "taylor", "adjoint"}

# name: (fn, args, reference, verify_vjp options, the checks that flag it, the leaves that fail)
MISTAKES = {
    "a": (mm_no_transpose, MM_ARGS, ref.mm, {}, WRONG_DERIVATIVE, ["z"]),
    "b": (layer_norm_s_no_xhat_term, LN_ARGS, ref.layer_norm_s, {}, WRONG_DERIVATIVE, ["z"]),
    "c": (tanh_wrong_sign, TANH_ARGS, ref.tanh, {}, WRONG_DERIVATIVE, ["z"]),
    "d": (conv1d_s_off_by_one, CONV_ARGS, ref.conv1d_s, {}, WRONG_DERIVATIVE, ["z"]),
    "e": (batch_ce_missing_mean, CE_ARGS, batch_ce_reference, {}, WRONG_DERIVATIVE, ["T"]),
    # At the kink only the reference's derivative (autodiff's convention σ'(0) = 0) decides;
    # finite differences, Taylor and the adjoint test leave the kink out.
    "f": (relu_mask_ge, kink_at(3), ref.relu, {}, {"autodiff"}, ["z"]),
    "g": (softplus_forgets_beta, SOFTPLUS_ARGS, P(ref.softplus, beta=BETA), {},
          WRONG_DERIVATIVE, ["z"]),
    "h": (residual_no_skip, RES_ARGS, P(ref.residual, activation=ref.tanh), {},
          WRONG_DERIVATIVE, ["z"]),
    # Only the data argument z is batched, as in training: the module's batching rule then
    # runs the core once on the batch, and its backward sees the batch axis.
    "j": (mm_per_example, MM_ARGS, ref.mm, {"argnums": (0, 1), "batch_argnums": (1,)},
          {"vmap"}, []),
    # Python control flow on array values: right eagerly, but every transformation that traces
    # the backward (jit, vmap, differentiating it) fails.
    "i": (tanh_python_if, (n(20, 5),), ref.tanh, {}, {"jit", "vmap", "reverse_over_reverse"}, []),
    "k": (sigmoid_stop_gradient, SIGMOID_ARGS, ref.sigmoid, {}, {"reverse_over_reverse"}, []),
    "l": (mm_clip_1, CLIP_ARGS, ref.mm, {}, WRONG_DERIVATIVE | {"linearity"},
          ["params['W']", "params['b']", "z"]),
    # Clipping at ±3 never bites on the tested cotangents v (|v| < 3), only on 2v − 3v'.
    "l'": (mm_clip_3, CLIP_ARGS, ref.mm, {}, {"linearity"}, []),
    # Clipping at ±10 is not reached even by 2v − 3v': only v scaled by 10⁶ reaches it.
    "l''": (mm_clip_10, CLIP_ARGS, ref.mm, {}, {"linearity"}, []),
    # Right in value, so every numerical check passes it; jax.grad then returns float64.
    "m": (tanh_float64_cotangent, TANH32_ARGS, ref.tanh, {}, {"contract"}, []),
    # Within every tolerance (1e-12 relative), but two runs of one seed differ.
    "n": (tanh_noisy, TANH_ARGS, ref.tanh, {}, {"determinism"}, []),
    # A 200 % error on the element −1 next to 10⁸ and 9·10⁶: only per-element errors see it
    # (the adjoint and Taylor tests sum over the leaf, where 10⁸ drowns it).
    "o": (cube_abs, CUBE_ARGS, cube_reference, {}, {"autodiff", "finite_differences"}, ["z"]),
    # The notes-form backward gives the integer step a float cotangent.
    "p": (scaled_mm, SCALED_MM_ARGS, None, {"backward": scaled_mm_backward}, {"integer_leaves"},
          ["params['step']"]),
    # The forward rule's output differs (eps 1e-3 for 1e-5); the backward is right.
    "q": (layer_norm_s_fwd_eps, LN_ARGS, ref.layer_norm_s, {}, {"primal"}, []),
    # B(0) = 0/0 = NaN: no other check has a zero cotangent.
    "r": (tanh_rescaled, TANH_ARGS, ref.tanh, {}, {"zeros"}, []),
    # float32 at 1000 + N(0, 1): within the per-element tolerance (the element's local scale is
    # 10³ times its value), but 30 times the error of autodiff of the reference in float32.
    "s": (layer_norm_s_one_pass, OFFSET_LN_ARGS, ref.layer_norm_s, {}, {"precision"}, []),
    # e^{−z} overflows at the inputs ×10³ and ×10⁶ (z < −709), where σ' is finite (≈ 0).
    "t": (sigmoid_naive, SIGMOID_ARGS, ref.sigmoid, {}, {"nonfinite"}, []),
    # Mistake (j) written as fn(z, params): batching each argument in turn still batches z alone.
    "j'": (mm_per_example_data_first, MM_ARGS[::-1], lambda z, p: ref.mm(p, z), {}, {"vmap"}, []),
}

# Without a reference: finite differences and Taylor (and the adjoint test, whose J t then
# comes from finite differences) still catch a wrong derivative; reverse-over-reverse needs no reference either.
NO_REFERENCE = {"a": {"finite_differences", "taylor", "adjoint"},
                "c": {"finite_differences", "taylor", "adjoint"},
                "g": {"finite_differences", "taylor", "adjoint"}}

EXPECTED = {name: case[4] for name, case in MISTAKES.items()}
EXPECTED.update({name + " (no reference)": flags for name, flags in NO_REFERENCE.items()})


@functools.cache
def report_of(name: str, with_reference: bool = True):
    fn, args, reference, options, _, _ = MISTAKES[name]
    options = dict(options)
    return verify_vjp(fn, *args, reference=reference if with_reference else None,
                      name=name, **options)


# ============================================================================================
# Every mistake is caught, by exactly the checks listed
# ============================================================================================
@pytest.mark.parametrize("name", list(MISTAKES))
def test_mistake_is_caught_by_exactly_these_checks(name):
    report = report_of(name)
    expected_flags, expected_leaves = MISTAKES[name][4], MISTAKES[name][5]
    assert not report.passed, f"({name}) not caught:\n{report}"
    assert report.failures(), "a failed report lists its failures"
    assert flagged(report) == expected_flags, f"({name}):\n{report}\n" + "\n".join(report.failures())
    assert failed_leaves(report) == expected_leaves, str(report)


@pytest.mark.parametrize("name", list(NO_REFERENCE))
def test_finite_differences_need_no_reference(name):
    """(n) With reference=None there is no autodiff comparison, and finite differences and the
    Taylor test alone (with the FD adjoint test) catch mistakes a, c and g."""
    report = report_of(name, with_reference=False)
    assert all(leaf.autodiff is None for leaf in report.leaves)
    assert not check(report, "reverse_over_reverse").skipped   # needs no reference either
    assert flagged(report) == NO_REFERENCE[name], str(report)
    for leaf in report.leaves:
        if leaf.leaf == "z":
            assert leaf.finite_differences.error > 0.1 and leaf.taylor.rate2 < 1.5
        else:   # the right parts stay right
            assert leaf.passed


def test_a_failure_names_the_leaf_index_and_values():
    """(a) The report says where: B[MM, z] is wrong, B[MM, W] and B[MM, b] are right."""
    report = report_of("a")
    (W, b, z) = report.leaves
    assert W.passed and b.passed and not z.passed
    c = z.autodiff   # at the worst index: the hand-written W v against the expected Wᵀ v
    assert c.error > 0.1 and c.tol == 1e-9 and c.actual != pytest.approx(c.expected)
    assert any(line.startswith("a: z vs autodiff") and "worst at index" in line
               for line in report.failures())
    assert z.taylor.rate1 == pytest.approx(1, abs=0.05)   # J changes at rate 1 either way,
    assert z.taylor.rate2 == pytest.approx(1, abs=0.05)   # but the remainder only at rate 1


def test_adjoint_test_catches_the_missing_transpose():
    """(m) The dot-product test ⟨J t, v⟩ = ⟨t, Jᵀv⟩ flags W v for Wᵀ v: one scalar per call,
    with a reference's JVP or with finite differences."""
    for with_reference in (True, False):
        adjoint = check(report_of("a", with_reference), "adjoint")
        assert not adjoint.passed and adjoint.error > 1e-2 and adjoint.tol == 1e-6
    # and it passes the correct MM
    assert check(verify_vjp(jb.mm, *MM_ARGS, reference=ref.mm, checks=("adjoint",)),
                 "adjoint").passed


def test_f_relu_kink_caught_only_against_autodiff():
    """(f) At z = 0 the one-sided derivatives are 0 and 1: finite differences leave the kink
    out, the Taylor direction and the adjoint tangent are zero there, so only the reference's derivative (its
    convention σ'(0) = 0) tells z ≥ 0 from z > 0."""
    report = report_of("f")
    (z,) = report.leaves
    assert z.finite_differences.passed and z.finite_differences.note == "1 kink(s) left out"
    assert z.taylor.passed
    assert not z.autodiff.passed and z.autodiff.worst_index == (3,)
    assert z.autodiff.expected == 0.0 and z.autodiff.actual != 0.0   # autodiff: σ'(0) = 0
    assert flagged(report) == {"autodiff"}


@pytest.mark.parametrize("index", [2, 3])
def test_f_at_either_side_of_delta_only_autodiff_decides(index):
    """(f) The Taylor direction δ and the adjoint tangent are zero at the kinks that finite
    differences found, so neither depends on which way δ points across the kink."""
    report = verify_vjp(relu_mask_ge, *kink_at(index), reference=ref.relu)
    assert flagged(report) == {"autodiff"}


@pytest.mark.parametrize("index", [2, 3])
@pytest.mark.parametrize("with_reference", [True, False])
def test_correct_relu_passes_with_its_kink_anywhere(index, with_reference):
    report = verify_vjp(jb.relu, *kink_at(index), reference=ref.relu if with_reference else None)
    assert report.passed, "\n".join(report.failures())


def test_i_python_if_works_eagerly_but_not_under_jit():
    """(i) The mistake is real: the backward is right when run eagerly, and breaks under jit."""
    z, v = n(20, 5), n(21, 5)
    (got,) = jax.vjp(tanh_python_if, z)[1](v)
    (expected,) = jax.vjp(ref.tanh, z)[1](v)
    assert jnp.allclose(got, expected, rtol=1e-12)
    with pytest.raises(jax.errors.ConcretizationTypeError):
        jax.jit(lambda z, v: jax.vjp(tanh_python_if, z)[1](v))(z, v)


def test_i_jit_check_flags_python_control_flow():
    report = verify_vjp(tanh_python_if, n(20, 5), reference=ref.tanh)
    jit = check(report, "jit")
    assert not jit.passed
    assert "ConcretizationTypeError" in jit.note or "TracerBoolConversionError" in jit.note
    (z,) = report.leaves
    assert z.autodiff.passed and z.finite_differences.passed   # eagerly, it is right


def test_j_only_vmap_catches_a_backward_that_ignores_the_batch():
    """(j) Per example the backward is right (every per-example check passes); under vmap the
    module's core runs once on the batch and jnp.outer(v, z) makes a (3·3, 3·4) "gradient"."""
    report = report_of("j")
    assert all(leaf.passed for leaf in report.leaves)
    vmap = check(report, "vmap")
    assert not vmap.passed and "hand-written backward must return the arguments' shapes" in vmap.note
    # the per-example rule really is right: jax.grad of one example
    params, z = MM_ARGS
    g = jax.grad(lambda p, z: jnp.sum(mm_per_example(p, z) ** 2), (0, 1))(params, z)
    g_ref = jax.grad(lambda p, z: jnp.sum(ref.mm(p, z) ** 2), (0, 1))(params, z)
    assert jax.tree.all(jax.tree.map(lambda a, b: jnp.allclose(a, b, rtol=1e-12), g, g_ref))


def test_j_vmap_check_must_batch_only_the_data():
    """(j) The default batch_argnums of fn(params, z) batches the data only, as in training, and
    catches the mistake. Batching the weights too makes the module's batching rule fall back to
    JAX's own per-example batching of the custom_vjp, whose backward never sees a batch axis, so
    the mistake is not exercised: this pins why the default is what it is."""
    report = verify_vjp(mm_per_example, *MM_ARGS, reference=ref.mm, checks=("vmap",))
    assert not check(report, "vmap").passed
    report = verify_vjp(mm_per_example, *MM_ARGS, reference=ref.mm, checks=("vmap",),
                        batch_argnums=(0, 1))
    assert check(report, "vmap").passed


def test_k_only_reverse_over_reverse_catches_a_stopped_gradient():
    """(k) The first derivative is right; the derivative of the backward w.r.t. z is lost."""
    report = report_of("k")
    ror = check(report, "reverse_over_reverse")
    assert not ror.passed and ror.error == pytest.approx(1.0)   # the whole second derivative
    assert all(leaf.passed for leaf in report.leaves)


@pytest.mark.parametrize("name", ["l", "l'"])
def test_l_linearity_in_v_flags_clipping(name):
    """(l) B(2v − 3v') = 2 B(v) − 3 B(v') fails for a clipped v. Clipping at ±1 also changes
    B(v) itself; clipping at ±3 leaves the tested B(v) exact, and only linearity sees it."""
    report = report_of(name)
    lin = check(report, "linearity")
    assert not lin.passed and lin.error > 0.1
    if name == "l'":
        assert flagged(report) == {"linearity"}          # caught nowhere else
    else:
        assert "linearity" in flagged(report) and len(flagged(report)) > 1


def test_assert_vjp_correct_raises_on_a_mistake():
    with pytest.raises(AssertionError, match=r"a: z vs autodiff: error .* worst at index"):
        assert_vjp_correct(mm_no_transpose, *MM_ARGS, reference=ref.mm, name="a",
                           checks=("autodiff",))


# ============================================================================================
# Every correct module of the library passes
# ============================================================================================
CORRECT = {
    "mm": (jb.mm, ref.mm, MM_ARGS, {"batch_argnums": (1,)}),
    "layer_norm": (jb.layer_norm, ref.layer_norm,
                   ({"beta": n(22, 6), "gamma": n(23, 6)}, n(24, 6)), {"batch_argnums": (1,)}),
    "conv1d_s": (jb.conv1d_s, ref.conv1d_s, CONV_ARGS, {"batch_argnums": (1,)}),
    "relu at a kink": (jb.relu, ref.relu, kink_at(2), {}),
    "tanh": (jb.tanh, ref.tanh, TANH_ARGS, {}),
    "softplus(β=3)": (P(jb.softplus, beta=BETA), P(ref.softplus, beta=BETA), SOFTPLUS_ARGS, {}),
    "residual": (jb.residual, ref.residual, RES_ARGS, {"batch_argnums": (1,)}),
}


@pytest.mark.parametrize("name", list(CORRECT))
def test_correct_module_passes(name):
    fn, reference, args, options = CORRECT[name]
    report = verify_vjp(fn, *args, reference=reference, name=name, **options)
    assert report.passed, "\n".join(report.failures()) + "\n" + str(report)
    assert flagged(report) == set()
    # every check ran, but those with nothing to do in float64 without integer leaves
    assert {c.key for c in report.checks if c.skipped} == {"precision", "integer_leaves"}
    if name == "relu at a kink":
        assert report.leaves[0].finite_differences.note == "1 kink(s) left out"


# ============================================================================================
# docs/verifying.md's table "What each check catches" is EXPECTED
# ============================================================================================
_DOC_COLUMNS = list(ALL_CHECKS)


def test_the_docs_table_is_these_results():
    text = DOC.read_text(encoding="utf-8")
    found = re.search(r"^## [\d. ]*What each check catches\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert found, f"no section 'What each check catches' in {DOC}"
    section = found.group(1)
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*\(([a-z]'{0,2})\)(?P<noref> no reference)?\s*\|", line)
        if not m:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        marks = cells[2:2 + len(_DOC_COLUMNS)]
        assert len(marks) == len(_DOC_COLUMNS), line
        name = m.group(1) + (" (no reference)" if m.group("noref") else "")
        rows[name] = {col for col, mark in zip(_DOC_COLUMNS, marks) if mark.startswith("✓")}
    assert rows == EXPECTED

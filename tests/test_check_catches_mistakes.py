"""The checker fails wrong backwards and passes right ones.

Each mistake below is a realistic bug in a hand-written backward, written as its own small
``jax.custom_vjp`` the way the library's modules are written (forward, ``_fwd`` saving
residuals, ``_bwd``, ``defvjp``), next to the correct pure-jnp reference. For each one the
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
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from jbackprop.modules.wiring import apply
from jbackprop.check import ALL_CHECKS, verify_vjp
from jbackprop.testing import assert_vjp_correct

P = functools.partial
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "verifying.md"

# The names of the whole-function checks in a Report, as in ALL_CHECKS.
_CHECK_PREFIX = {"contract": "contract", "determinism": "determinism", "adjoint": "adjoint", "linearity": "linearity", "jit": "jit", "vmap": "vmap",
                 "reverse-over-reverse": "reverse_over_reverse"}


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
            out.add(next(v for k, v in _CHECK_PREFIX.items() if c.name.startswith(k)))
    assert out <= set(ALL_CHECKS)
    return out


def failed_leaves(report) -> list[str]:
    return [leaf.leaf for leaf in report.leaves if not leaf.passed]


def check(report, name):
    """The whole-function check ``name`` (as in ``ALL_CHECKS``) of ``report``."""
    return next(c for c in report.checks if _CHECK_PREFIX[c.name.split(" ")[0]] == name)


def n(seed, *shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64)


# ============================================================================================
# The mistakes. Each: a custom_vjp with one bug (marked BUG), its correct reference, its inputs.
# ============================================================================================

# --- (a) MM with W instead of Wᵀ in B[MM, z] (square W, so the shapes fit) -----------------
@jax.custom_vjp
def mm_no_transpose(params, z):
    return params["W"] @ z + params["b"]


def _mm_no_transpose_fwd(params, z):
    return mm_no_transpose(params, z), (params["W"], z)


def _mm_no_transpose_bwd(res, v):
    W, z = res
    return {"W": jnp.outer(v, z), "b": v}, W @ v          # BUG: W v, should be Wᵀ v


mm_no_transpose.defvjp(_mm_no_transpose_fwd, _mm_no_transpose_bwd)
MM_ARGS = ({"W": n(1, 4, 4), "b": n(2, 4)}, n(3, 4))


# --- (b) layer norm (LN-S) without the mean(g ⊙ x̂) term ------------------------------------
def _standardise(z, eps=1e-5):
    d = z - jnp.mean(z)
    r = jax.lax.rsqrt(jnp.mean(d * d) + eps)              # 1/σ̂
    return d * r, r


@jax.custom_vjp
def layer_norm_s_no_xhat_term(z):
    return _standardise(z)[0]


def _ln_fwd(z):
    xhat, r = _standardise(z)
    return xhat, (xhat, r)


def _ln_bwd(res, v):
    xhat, r = res
    return (r * (v - jnp.mean(v)),)                       # BUG: − x̂ · mean(v ⊙ x̂) is missing


layer_norm_s_no_xhat_term.defvjp(_ln_fwd, _ln_bwd)
LN_ARGS = (n(4, 6),)


# --- (c) a sign error: tanh backward −(1 − t²) v ----------------------------------------------
@jax.custom_vjp
def tanh_wrong_sign(z):
    return jnp.tanh(z)


def _tanh_fwd(z):
    t = jnp.tanh(z)
    return t, t


def _tanh_wrong_sign_bwd(t, v):
    return (-(1 - t * t) * v,)                            # BUG: the sign


tanh_wrong_sign.defvjp(_tanh_fwd, _tanh_wrong_sign_bwd)
TANH_ARGS = (n(5, 5),)


# --- (d) Conv1D-S whose input gradient is padded off by one -----------------------------------
def _correlate(x, w, pad):
    """Same-size correlation ``Σ_j w_j x_{i − pad[0] + j}`` of ``x`` zero-padded by ``pad``."""
    m = x.shape[0]
    xp = jnp.pad(x, pad)
    return sum(w[j] * xp[j:j + m] for j in range(w.shape[0]))


@jax.custom_vjp
def conv1d_s_off_by_one(params, z):
    ell = params["w"].shape[0] // 2
    return _correlate(z, params["w"], (ell, ell)) + params["b"]


def _conv_fwd(params, z):
    return conv1d_s_off_by_one(params, z), (params["w"], z)


def _conv_bwd(res, v):
    w, z = res
    k, m = w.shape[0], z.shape[0]
    ell = k // 2
    zp = jnp.pad(z, (ell, ell))
    w_bar = jnp.stack([jnp.vdot(v, zp[j:j + m]) for j in range(k)])   # Σ_i v_i z_{i−ℓ+j}
    z_bar = _correlate(v, jnp.flip(w), (ell + 1, ell - 1))  # BUG: should be padded (ℓ, ℓ)
    return {"w": w_bar, "b": jnp.sum(v)}, z_bar


conv1d_s_off_by_one.defvjp(_conv_fwd, _conv_bwd)
CONV_ARGS = ({"w": n(6, 3), "b": n(7)}, n(8, 8))


# --- (e) a batch loss whose backward sums instead of averaging (missing 1/B) ------------------
def _per_example_ce(T, y):
    m = jnp.max(T, axis=-1, keepdims=True)
    lse = m[:, 0] + jnp.log(jnp.sum(jnp.exp(T - m), axis=-1))
    return lse - jnp.take_along_axis(T, y[:, None], axis=-1)[:, 0]


@jax.custom_vjp
def batch_ce_missing_mean(T, y):
    """mean over the batch of the cross-entropy of logits T (B, k) with labels y (B,)."""
    return jnp.mean(_per_example_ce(T, y))


def _batch_ce_fwd(T, y):
    return batch_ce_missing_mean(T, y), (jax.nn.softmax(T, axis=-1), y)


def _batch_ce_bwd(res, v):
    p, y = res
    onehot = jax.nn.one_hot(y, p.shape[-1], dtype=p.dtype)
    return (p - onehot) * v, None                         # BUG: should be (p − onehot) v / B


batch_ce_missing_mean.defvjp(_batch_ce_fwd, _batch_ce_bwd)


def batch_ce_reference(T, y):
    return jnp.mean(jax.vmap(ref.cross_entropy_loss)(T, y))


CE_ARGS = (n(9, 4, 3), jnp.array([0, 2, 1, 2]))


# --- (f) ReLU with the mask z ≥ 0 (σ'(0) = 1), at an input with an exact 0 --------------------
@jax.custom_vjp
def relu_mask_ge(z):
    return jnp.maximum(z, 0)


def _relu_ge_fwd(z):
    return relu_mask_ge(z), z


def _relu_ge_bwd(z, v):
    return (jnp.where(z >= 0, v, 0.0),)                   # BUG: z > 0 (σ'(0) = 0, as jax.nn.relu)


relu_mask_ge.defvjp(_relu_ge_fwd, _relu_ge_bwd)


def kink_at(i):
    """An input of ReLU with an exact 0 (a kink) at index ``i``."""
    return (jnp.array([0.7, -1.3, 0.5, 2.1, -0.4]).at[i].set(0.0),)


# --- (g) softplus(β) whose backward forgets β: sigmoid(z) instead of sigmoid(βz) ----------------
BETA = 3.0


@P(jax.custom_vjp, nondiff_argnums=(1,))
def _softplus_forgets_beta(z, beta):
    return jnp.logaddexp(0, beta * z) / beta


def _softplus_fwd(z, beta):
    return _softplus_forgets_beta(z, beta), z


def _softplus_forgets_beta_bwd(beta, z, v):
    return (jax.nn.sigmoid(z) * v,)                       # BUG: sigmoid(β z)


_softplus_forgets_beta.defvjp(_softplus_fwd, _softplus_forgets_beta_bwd)


def softplus_forgets_beta(z):
    return _softplus_forgets_beta(z, BETA)


SOFTPLUS_ARGS = (n(10, 5),)


# --- (h) a residual block whose backward drops the skip gradient ------------------------------
@jax.custom_vjp
def residual_no_skip(params, z):
    inner = lambda p, x: jnp.tanh(p["W"] @ x + p["b"])
    return z + inner(params["mm2"], inner(params["mm1"], z))


def _residual_fwd(params, z):
    a1, mm1_back = jb.mm.vjp(params["mm1"], z)            # each pullback holds its residuals
    h1, sigma1_back = jb.tanh.vjp(a1)
    a2, mm2_back = jb.mm.vjp(params["mm2"], h1)
    h2, sigma2_back = jb.tanh.vjp(a2)
    return z + h2, (mm1_back, sigma1_back, mm2_back, sigma2_back)


def _residual_no_skip_bwd(res, v):
    mm1_back, sigma1_back, mm2_back, sigma2_back = res
    (a2_bar,) = sigma2_back(v)
    mm2_bar, h1_bar = mm2_back(a2_bar)
    (a1_bar,) = sigma1_back(h1_bar)
    mm1_bar, z_bar = mm1_back(a1_bar)
    return {"mm1": mm1_bar, "mm2": mm2_bar}, z_bar        # BUG: should be v + z_bar


residual_no_skip.defvjp(_residual_fwd, _residual_no_skip_bwd)
RES_ARGS = ({"mm1": {"W": n(11, 4, 4) / 2, "b": n(12, 4)},
             "mm2": {"W": n(13, 4, 4) / 2, "b": n(14, 4)}}, n(15, 4))


# --- (i) jit: Python control flow on array values in the backward -----------------------------
@jax.custom_vjp
def tanh_python_if(z):
    return jnp.tanh(z)


def _tanh_python_if_bwd(t, v):
    if float(jnp.max(jnp.abs(t))) < 1.0:                  # BUG: a Python `if` on an array value
        return ((1 - t * t) * v,)                         # "fast path": nothing saturated
    return (jnp.where(jnp.abs(t) < 1.0, (1 - t * t) * v, 0.0),)


tanh_python_if.defvjp(_tanh_fwd, _tanh_python_if_bwd)


# --- (j) vmap: a batching-dispatch module whose core backward ignores the batch axes ----------
@jax.custom_vjp
def _mm_per_example(params, z):
    return z @ params["W"].T + params["b"]                # batched: U = X Wᵀ + b


def _mm_per_example_fwd(params, z):
    return _mm_per_example(params, z), (params["W"], z)


def _mm_per_example_bwd(res, v):
    W, z = res
    batch = tuple(range(z.ndim - 1))
    # BUG: jnp.outer flattens a batched z; should be jnp.tensordot(v, z, axes=(batch, batch))
    return {"W": jnp.outer(v, z), "b": v.sum(axis=batch)}, v @ W


_mm_per_example.defvjp(_mm_per_example_fwd, _mm_per_example_bwd)


def mm_per_example(params, z):
    """MM whose core is called once on the whole batch under jax.vmap (as jb.mm)."""
    return apply(_mm_per_example, params, z, batch_argnums=(1,))


# --- (k) reverse-over-reverse: right first derivative, wrong derivative of the backward -------
@jax.custom_vjp
def sigmoid_stop_gradient(z):
    return jax.nn.sigmoid(z)


def _sigmoid_fwd(z):
    s = jax.nn.sigmoid(z)
    return s, s


def _sigmoid_stop_gradient_bwd(s, v):
    s = jax.lax.stop_gradient(s)                          # BUG: "the residual is a constant"
    return (s * (1 - s) * v,)


sigmoid_stop_gradient.defvjp(_sigmoid_fwd, _sigmoid_stop_gradient_bwd)
SIGMOID_ARGS = (n(16, 5),)


# --- (l) linearity in v: "gradient clipping" inside the backward ------------------------------
def _mm_clipping(bound):
    @jax.custom_vjp
    def mm_clipping(params, z):
        return params["W"] @ z + params["b"]

    def fwd(params, z):
        return mm_clipping(params, z), (params["W"], z)

    def bwd(res, v):
        W, z = res
        v = jnp.clip(v, -bound, bound)                    # BUG: a backward must be linear in v
        return {"W": jnp.outer(v, z), "b": v}, W.T @ v

    mm_clipping.defvjp(fwd, bwd)
    mm_clipping.__name__ = f"mm_clipping_{bound:g}"
    return mm_clipping


mm_clip_1, mm_clip_3, mm_clip_10 = _mm_clipping(1.0), _mm_clipping(3.0), _mm_clipping(10.0)
CLIP_ARGS = ({"W": n(17, 3, 4), "b": n(18, 3)}, n(19, 4))


# --- (m) contract: right values in the wrong dtype ---------------------------------------------
@jax.custom_vjp
def tanh_float64_cotangent(z):
    return jnp.tanh(z)


def _tanh_float64_bwd(t, v):
    return (((1 - t * t) * v).astype(jnp.float64),)       # BUG: float64 for a float32 z


tanh_float64_cotangent.defvjp(_tanh_fwd, _tanh_float64_bwd)
TANH32_ARGS = (n(21, 5).astype(jnp.float32),)


# --- (n) determinism: Python randomness in the backward -----------------------------------------
@jax.custom_vjp
def tanh_noisy(z):
    return jnp.tanh(z)


def _tanh_noisy_bwd(t, v):
    wobble = 1 + 1e-12 * np.random.default_rng().standard_normal()   # BUG: a new draw per call
    return ((1 - t * t) * v * wobble,)


tanh_noisy.defvjp(_tanh_fwd, _tanh_noisy_bwd)


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
    assert not vmap.passed and "Custom VJP bwd rule must produce an output" in vmap.note
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
    assert not any(c.skipped for c in report.checks)      # every check ran
    if name == "relu at a kink":
        assert report.leaves[0].finite_differences.note == "1 kink(s) left out"


# ============================================================================================
# docs/verifying.md's table "What each check catches" is EXPECTED
# ============================================================================================
_DOC_COLUMNS = ["contract", "determinism", "autodiff", "finite_differences", "taylor", "adjoint", "linearity", "jit", "vmap",
                "reverse_over_reverse"]


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

"""Forward mode by hand: every module's hand-written JVP, through every transformation.

For every registry case (every module and model at every example shape): the library's checker
``verify_jvp`` passes in float32 and float64 (``jax.jvp`` against ``jax.jvp`` of the reference,
float64 finite differences per output element, the adjoint identity between the two hand-written
rules, linearity, jit, vmap) and so does the notes-form ``jb.tangent(M)``; spies prove which rule
each transformation runs (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``: the JVP, never the
backward; ``jax.grad``: the backward, never the JVP; ``jax.hessian``: both), and each agrees with
the reference to 1e-10 in float64 (``jvp``, ``jacfwd``, ``linearize``, ``hessian``, ``grad``,
``vmap(grad)``, ``jit``). The checker's JVP checks are proven by planted mistakes
(``planted_forward.py``).
"""
import contextlib
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jbackprop as jb
from jbackprop import reference as ref
from jbackprop.check.cases import cast_case
from jbackprop.check.forward import JVP_CHECKS, verify_jvp
from jbackprop.modules import attention as attention_module, fused_loss, registry
from jbackprop.testing import assert_jvp_correct
import planted_forward as pf

CASES = registry.cases()
# every core of the library: the declared ones, and attention's inner (O, ℓ) core, which its
# forward rule calls
LIBRARY_CORES = {c for d in registry.declarations() for c in d.cores} | {
    attention_module._attention_with_lse, fused_loss._lce_with_lse}
# one example shape of each module and hyper-parameter setting
FIRST = list({c.name.split("[")[0]: c for c in reversed(CASES)}.values())[::-1]
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


# every case in float64; one example shape of each module in float32 (the precision of the
# rules themselves is the same at the other shape)
MATRIX = [(c, "float64") for c in CASES] + [(c, "float32") for c in FIRST]


@pytest.mark.parametrize("case, dtype", MATRIX, ids=[f"{c.name}-{d}" for c, d in MATRIX])
def test_verify_jvp(case, dtype):
    assert_jvp_correct(case.fn, *cast_case(case.args, dtype), reference=case.reference,
                       name=case.name, **case.options)


NOTES = [c for c in FIRST if hasattr(c.declaration.fn, "tangent")]


@pytest.mark.parametrize("case", NOTES, ids=[c.name for c in NOTES])
def test_notes_form_tangent(case):
    """``jb.tangent(M)(*arrays, *dots)`` (no autodiff) against ``jax.jvp`` of the reference and
    finite differences, and against the hand-written backward by the adjoint identity."""
    kw = case.fn.keywords
    tangent = jb.tangent(case.declaration.fn) if not kw else \
        lambda *a: case.declaration.fn.tangent(*a, **kw)
    assert_jvp_correct(case.fn, *cast_case(case.args, "float64"), reference=case.reference,
                       tangent=tangent, name=case.name, **case.options,
                       checks=("contract", "autodiff", "finite_differences", "adjoint_identity"))


# --- spies: which hand-written rule each transformation runs --------------------------------
@contextlib.contextmanager
def _spied(cores):
    """Each core's ``jvp`` and ``bwd`` counted: ``{"jvp": n, "bwd": n}`` over all cores."""
    calls = {"jvp": 0, "bwd": 0}
    originals = [(core, core.jvp, core.bwd) for core in cores]

    def spy(kind, rule):
        def counted(*a):
            calls[kind] += 1
            return rule(*a)
        return counted
    for core, jvp, bwd in originals:
        core.jvp, core.bwd = spy("jvp", jvp), spy("bwd", bwd)
    try:
        yield calls
    finally:
        for core, jvp, bwd in originals:
            core.jvp, core.bwd = jvp, bwd


def _problem(case):
    """``(J, J_reference, args, argnums, dots)``: a scalar function of the case's output."""
    args = cast_case(case.args, "float64")
    argnums = case.options["argnums"]
    scalar = lambda f: lambda *a: sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(f(*a)))
    key = jax.random.PRNGKey(3)
    dots = tuple(jax.tree.map(lambda x: jax.random.normal(key, x.shape, x.dtype), args[i])
                 for i in argnums)
    return scalar(case.fn), scalar(case.reference), args, argnums, dots


def _partial(J, args, argnums):
    """``J`` as a function of the differentiated arguments only."""
    def f(*diff):
        full = list(args)
        for i, d in zip(argnums, diff):
            full[i] = d
        return J(*full)
    return f


@pytest.mark.parametrize("case", FIRST, ids=[c.name for c in FIRST])
def test_each_transformation_runs_its_rule_and_equals_the_reference(case):
    J, Jr, args, argnums, dots = _problem(case)
    f, fr = _partial(J, args, argnums), _partial(Jr, args, argnums)
    primals = tuple(args[i] for i in argnums)
    cores = case.declaration.cores
    forward = {
        "jvp": (lambda g: jax.jvp(g, primals, dots)),
        "jacfwd": (lambda g: jax.jacfwd(g, tuple(range(len(primals))))(*primals)),
        "linearize": (lambda g: jax.linearize(g, *primals)[1](*dots)),
        "jit(jvp)": (lambda g: jax.jit(lambda *p: jax.jvp(g, p, dots))(*primals)),
    }
    for name, run in forward.items():
        with _spied(cores) as calls:
            out = run(f)
        assert calls["jvp"] > 0 and calls["bwd"] == 0, f"{name} ran {calls}"
        chex.assert_trees_all_close(out, jax.jit(lambda: run(fr))(), **TIGHT)
    reverse = {
        "grad": lambda g: jax.grad(g, tuple(range(len(primals))))(*primals),
        "jit(grad)": lambda g: jax.jit(jax.grad(g, tuple(range(len(primals)))))(*primals),
    }
    for name, run in reverse.items():
        with _spied(cores) as calls:
            out = run(f)
        assert calls["bwd"] > 0 and calls["jvp"] == 0, f"{name} ran {calls}"
        chex.assert_trees_all_close(out, jax.jit(lambda: run(fr))(), **TIGHT)


@pytest.mark.parametrize("case", FIRST, ids=[c.name for c in FIRST])
def test_hessian_runs_both_rules_and_equals_the_reference(case):
    """``jax.hessian`` (forward over reverse) of every module and model, w.r.t. all its
    differentiated arguments, to 1e-10 in float64."""
    J, Jr, args, argnums, _ = _problem(case)
    with _spied(case.declaration.cores) as own, _spied(LIBRARY_CORES) as every:
        H = jax.jit(jax.hessian(J, argnums))(*args)     # compiled once, not op by op
    # the module's backward, and hand-written JVPs over its forward (the residual block's
    # forward rule runs its parts' rules: their JVPs are the ones differentiated)
    assert own["bwd"] > 0 and every["jvp"] > 0, (own, every)
    chex.assert_trees_all_close(H, jax.jit(jax.hessian(Jr, argnums))(*args), **TIGHT)


BATCHED = [c for c in FIRST if c.declaration.batch_axes]


@pytest.mark.parametrize("case", BATCHED, ids=[c.name for c in BATCHED])
def test_per_example_gradients_and_jvps_under_vmap(case):
    """``vmap(grad)`` and ``vmap(jvp)`` over a batch of three examples of the data."""
    J, Jr, args, argnums, dots = _problem(case)
    data = [i for i, a in enumerate(args) if not isinstance(a, (dict, list, tuple))]
    stack = lambda a, i: jax.tree.map(lambda x: jnp.stack([x, 0.5 * x + 1, -x]) if i in argnums
                                      else jnp.stack([x] * 3), a)
    batched = [stack(a, i) if i in data else a for i, a in enumerate(args)]
    in_axes = tuple(0 if i in data else None for i in range(len(args)))
    for g in (lambda F: jax.grad(F, argnums), lambda F: lambda *a: jax.jvp(
            lambda *d: _partial(F, a, argnums)(*d), tuple(a[i] for i in argnums), dots)):
        chex.assert_trees_all_close(jax.jit(jax.vmap(g(J), in_axes))(*batched),
                                    jax.jit(jax.vmap(g(Jr), in_axes))(*batched), **TIGHT)


# --- second order of the models' losses ------------------------------------------------------
def _mlp_loss(mlp):
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 4), jnp.float64)
    y = jnp.array([0, 2, 1, 1, 0, 2])

    def loss(params):
        logits = jax.vmap(lambda xi: mlp(params, xi))(x)
        return jnp.mean(jax.vmap(jb.cross_entropy_loss)(logits, y))
    return loss


def _models():
    key = jax.random.PRNGKey(0)
    mlp_params = jb.mlp_init(key, [4, 6, 3], jnp.float64)
    res_params = jb.resnet_s_init(key, 4, 5, 2, 3, jnp.float64)
    return [("mlp", jb.mlp, registry.reference_of(jb.mlp), mlp_params),
            ("resnet_s", jb.resnet_s, registry.reference_of(jb.resnet_s), res_params)]


@pytest.mark.parametrize("name, model, model_ref, params", _models(), ids=["mlp", "resnet_s"])
def test_model_loss_hessian_and_hessian_vector_products(name, model, model_ref, params):
    """The Hessian of the training loss equals the reference's to 1e-10 (float64);
    forward-over-reverse and reverse-over-reverse Hessian-vector products agree with it."""
    loss, loss_ref = _mlp_loss(model), _mlp_loss(model_ref)
    flat, unravel = ravel_pytree(params)
    H = jax.jit(jax.hessian(lambda w: loss(unravel(w))))(flat)
    H_ref = jax.jit(jax.hessian(lambda w: loss_ref(unravel(w))))(flat)
    np.testing.assert_allclose(H, H_ref, rtol=1e-10, atol=1e-10)
    v = unravel(jax.random.normal(jax.random.PRNGKey(2), flat.shape, jnp.float64))
    fwd_over_rev = jax.jit(lambda p: jax.jvp(jax.grad(loss), (p,), (v,))[1])(params)
    rev_over_rev = jax.jit(jax.grad(lambda p: jnp.vdot(ravel_pytree(jax.grad(loss)(p))[0],
                                                       ravel_pytree(v)[0])))(params)
    Hv = H_ref @ ravel_pytree(v)[0]
    np.testing.assert_allclose(ravel_pytree(fwd_over_rev)[0], Hv, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ravel_pytree(rev_over_rev)[0], Hv, rtol=1e-10, atol=1e-10)


# --- the checker's JVP checks catch planted mistakes ------------------------------------------
MM_REF = lambda p, z: p["W"] @ z + p["b"]
MISTAKES = {   # name: (function, args, reference, flagged with a reference, without one)
    "(A) MM JVP with Wᵀ ż": (pf.mm_jvp_transposed, pf.MM_ARGS, MM_REF,
                             {"autodiff", "finite_differences", "adjoint_identity"},
                             {"finite_differences", "adjoint_identity"}),
    "(B) MM JVP without Ẇ z": (pf.mm_jvp_no_weight_term, pf.MM_ARGS, MM_REF,
                               {"autodiff", "finite_differences", "adjoint_identity"},
                               {"finite_differences", "adjoint_identity"}),
    "(C) ReLU JVP with 1{z ≥ 0}": (pf.relu_jvp_kink, pf.RELU_ARGS, ref.relu,
                                   {"autodiff", "adjoint_identity"}, {"adjoint_identity"}),
    "(D) LN-S JVP without x̂ mean(ż ⊙ x̂)": (pf.layer_norm_s_jvp_no_xhat_term, pf.LN_ARGS,
                                            ref.layer_norm_s,
                                            {"autodiff", "finite_differences", "adjoint_identity"},
                                            {"finite_differences", "adjoint_identity"}),
    "(E) tanh JVP of |ż|": (pf.tanh_jvp_abs, pf.TANH_ARGS, jnp.tanh,
                            {"autodiff", "finite_differences", "adjoint_identity", "linearity"},
                            {"finite_differences", "adjoint_identity", "linearity"}),
}


def _flagged(report) -> set:
    out = {k for leaf in report.leaves for k in ("autodiff", "finite_differences")
           if getattr(leaf, k) is not None and not getattr(leaf, k).passed}
    return out | {c.key for c in report.checks if not c.passed}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_planted_jvp_mistake_is_caught_by_exactly_these_checks(name):
    fn, args, reference, with_ref, without_ref = MISTAKES[name]
    assert _flagged(verify_jvp(fn, *args, reference=reference)) == with_ref
    assert _flagged(verify_jvp(fn, *args)) == without_ref


def test_right_rules_pass_without_a_reference_and_with_one():
    assert_jvp_correct(pf.cube, *pf.CUBE_ARGS)
    assert_jvp_correct(pf.cube, *pf.CUBE_ARGS, reference=lambda z: z ** 3 / 3)
    assert set(JVP_CHECKS) == {c.key for c in verify_jvp(pf.cube, *pf.CUBE_ARGS).checks} | {
        "autodiff", "finite_differences"}


# --- errors ------------------------------------------------------------------------------------
def test_errors_name_what_is_wrong():
    f = jb.custom_rules(lambda z: z * 2)
    with pytest.raises(TypeError, match=r"no hand-written rules yet: call .*defrules"):
        jax.jvp(f, (jnp.ones(2),), (jnp.ones(2),))
    with pytest.raises(ValueError, match="nondiff_argnames"):
        jb.custom_rules(lambda z: z, nondiff_argnames=("eps",))
    wrong = jb.custom_rules(lambda z: z * 2)
    wrong.defrules(lambda z: (wrong(z), None), lambda _, v: (2 * v,), lambda _, z_dot: z_dot[:1])
    with pytest.raises(TypeError, match=r"hand-written jvp must return the output's shapes"):
        jax.jvp(wrong, (jnp.ones(2),), (jnp.ones(2),))
    p, z = {"W": jnp.ones((2, 3)), "b": jnp.ones(2)}, jnp.ones(3)
    with pytest.raises(ValueError, match=r"mm.tangent: z_dot \(the tangent of z\) must have the shape of z"):
        jb.tangent(jb.mm)(p, z, p, jnp.ones(4))
    with pytest.raises(TypeError, match=r"mm.tangent takes the 2 array argument\(s\) params, z"):
        jb.tangent(jb.mm)(p, z, p)
    with pytest.raises(TypeError, match="not a jbackprop module"):
        jb.tangent(jnp.tanh)


def test_notes_form_tangent_of_mm_is_the_formula():
    """``J_MM ż = W ż + Ẇ z + ḃ`` (a closed form) in the arguments' promoted dtype (float32
    parameters with a float64 input: float64, as ``jnp`` computes ``W z + b``)."""
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    p = {"W": jax.random.normal(k[0], (3, 4), jnp.float32), "b": jax.random.normal(k[1], (3,), jnp.float32)}
    pd = {"W": jax.random.normal(k[2], (3, 4), jnp.float32), "b": jax.random.normal(k[3], (3,), jnp.float32)}
    z, zd = jax.random.normal(k[4], (4,), jnp.float64), jax.random.normal(k[5], (4,), jnp.float64)
    out = jb.tangent(jb.mm)(p, z, pd, zd)
    assert out.dtype == jnp.float64
    expected = p["W"].astype(jnp.float64) @ zd + pd["W"].astype(jnp.float64) @ z + pd["b"]
    chex.assert_trees_all_close(out, expected, rtol=1e-12)


def test_vmap_over_parameters_runs_the_rules_vmapped():
    """An ensemble (``vmap`` over the parameters, which have no leading batch axis in the
    core): ``grad``, ``jvp`` and ``hessian`` still run the hand-written rules (vmapped) and equal
    the reference."""
    keys = jax.random.split(jax.random.PRNGKey(4), 3)
    ensemble = jax.vmap(lambda k: jb.mlp_init(k, [3, 4, 2], jnp.float64))(keys)
    x = jnp.array([0.3, -1.2, 0.8])
    loss = lambda model: lambda ps: jnp.sum(jnp.sin(jax.vmap(model, (0, None))(ps, x)))
    f, fr = loss(jb.mlp), loss(registry.reference_of(jb.mlp))
    dots = jax.tree.map(jnp.ones_like, ensemble)
    with _spied(LIBRARY_CORES) as calls:
        g = jax.grad(f)(ensemble)
    assert calls["bwd"] > 0 and calls["jvp"] == 0, calls
    chex.assert_trees_all_close(g, jax.grad(fr)(ensemble), **TIGHT)
    with _spied(LIBRARY_CORES) as calls:
        t = jax.jvp(f, (ensemble,), (dots,))
    assert calls["jvp"] > 0 and calls["bwd"] == 0, calls
    chex.assert_trees_all_close(t, jax.jvp(fr, (ensemble,), (dots,)), **TIGHT)
    flat, unravel = ravel_pytree(ensemble)
    chex.assert_trees_all_close(jax.hessian(lambda w: f(unravel(w)))(flat),
                                jax.hessian(lambda w: fr(unravel(w)))(flat), **TIGHT)

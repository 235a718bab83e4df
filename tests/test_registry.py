"""Every declared module, through the one verification engine.

The cases are the registry's (``jbackprop.modules.registry.cases``), the same that
``jbackprop check`` runs. Each is verified by the library's checker (``assert_vjp_correct``: the
hand-written VJP against ``jax.grad`` of the pure-jnp reference, float64 finite differences, the
Taylor test, adjoint, linearity, jit, vmap, reverse-over-reverse) in float32 and float64; its
forward is compared with the reference; a spy proves that ``jax.grad`` runs the hand-written
``bwd``; and the notes-form ``M.backward`` is checked against the reference's VJP. The checker
itself is proven by ``test_check_catches_mistakes.py``. The registry's completeness (a
reference, cases, a derivation section, a layer, an API-table row for every public module) is
checked here too.
"""
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop.check.cases import cast_case
from jbackprop.modules import combinators, registry
from jbackprop.testing import assert_vjp_correct

CASES = registry.cases()
DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
# Public names that are not modules: helpers, initialisers, builders and subpackages.
NOT_MODULES = {"backward", "tangent", "custom_rules", "check", "testing", "combinators", "reference", "Layer", "serial",
               "mlp_init", "resnet_s_init", "conv_net", "multi_head_attention_init",
               "transformer_init"}


# every case in float64 (the tight check); the first example shape of each module (and
# hyper-parameter setting) in float32 too: the rules' float32 arithmetic is the same at the
# other shapes, and ``jbackprop check`` verifies every shape in both dtypes.
FIRST = list({c.name.split("[")[0]: c for c in reversed(CASES)}.values())[::-1]
MATRIX = [(c, "float64") for c in CASES] + [(c, "float32") for c in FIRST]


@pytest.mark.parametrize("case, dtype", MATRIX, ids=[f"{c.name}-{d}" for c, d in MATRIX])
def test_verify_vjp(case, dtype):
    args = cast_case(case.args, dtype)
    assert_vjp_correct(case.fn, *args, reference=case.reference, name=case.name, **case.options)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_forward_equals_reference(case):
    args = cast_case(case.args, "float64")
    chex.assert_trees_all_close(case.fn(*args), case.reference(*args), rtol=1e-12, atol=1e-12)


def _spied(cores):
    """Replace each core's ``bwd`` by a spy that counts its calls; returns the counts."""
    calls = {}
    for core in cores:
        original = core.bwd

        def spy(*a, core=core, original=original):
            calls[core.__name__] = calls.get(core.__name__, 0) + 1
            return original(*a)
        calls[core.__name__] = 0
        core.bwd, spy.original = spy, original
    return calls


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_grad_runs_the_hand_written_backward(case):
    """The jaxpr goes through every declared core (``custom_vjp_call`` or the ``jbackprop_call``
    dispatch), and ``jax.grad`` calls each core's hand-written ``bwd``."""
    args = cast_case(case.args, "float64")
    argnums = case.options["argnums"]
    J = lambda *a: sum(jnp.sum(o) for o in jax.tree.leaves(case.fn(*a)))
    text = str(jax.make_jaxpr(J)(*args))
    cores = case.declaration.cores
    assert cores, f"{case.name}: no hand-written core declared"
    for core in cores:
        assert f"name={core.__name__}" in text or f"call={core.__name__}" in text, \
            f"{core.__name__} is not in the jaxpr of {case.name}"
    calls = _spied(cores)
    try:
        jax.jit(jax.grad(J, argnums))(*args)
    finally:
        for core in cores:
            core.bwd = core.bwd.original
    assert all(n > 0 for n in calls.values()), f"jax.grad did not run every hand-written bwd: {calls}"


@pytest.mark.parametrize("case", [c for c in CASES if hasattr(c.declaration.fn, "backward")],
                         ids=[c.name for c in CASES if hasattr(c.declaration.fn, "backward")])
def test_notes_form_backward(case):
    """``M.backward(*arrays, v)`` (no autodiff) against ``jax.vjp`` of the reference."""
    args = cast_case(case.args, "float64")
    assert_vjp_correct(case.fn, *args, reference=case.reference, name=case.name,
                       backward=jb.backward(case.declaration.fn) if not case.fn.keywords else
                       lambda *a: case.declaration.fn.backward(*a[:-1], a[-1], **case.fn.keywords),
                       checks=("autodiff",), **case.options)


BATCHED = [c for c in CASES if c.declaration.batch_axes]


@pytest.mark.parametrize("case", BATCHED, ids=[c.name for c in BATCHED])
def test_leading_batch_axes_equal_vmap(case):
    """A module declared with ``batch_axes=True`` takes extra leading axes of its data (every
    argument that is not a parameter container) as a batch: the same as ``jax.vmap``."""
    args = cast_case(case.args, "float64")
    data = [i for i, a in enumerate(args) if not isinstance(a, (dict, list, tuple))]
    vary = case.options["argnums"]                 # a second, different example; labels repeat
    batched = [jax.tree.map(lambda x: jnp.stack([x, 0.5 * x + 1 if i in vary else x]), a)
               if i in data else a for i, a in enumerate(args)]
    in_axes = tuple(0 if i in data else None for i in range(len(args)))
    chex.assert_trees_all_close(case.fn(*batched), jax.vmap(case.fn, in_axes)(*batched),
                                rtol=1e-12, atol=1e-12)


# --- completeness: every public module is declared, and every declaration is complete --------
def _anchors(page: pathlib.Path) -> set[str]:
    """Heading anchors as MkDocs' toc extension makes them (explicit ``{#id}`` or slugified)."""
    out = set()
    for line in page.read_text().splitlines():
        m = re.match(r"#+\s+(.*?)\s*(\{#([\w-]+)\})?\s*$", line)
        if m:
            out.add(m.group(3) or re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", m.group(1)).strip().lower()))
    return out


def test_every_public_module_is_declared():
    public = {n for n in jb.__all__ if n not in NOT_MODULES}
    declared = {d.name for d in registry.declarations()}
    assert public == declared, f"undeclared: {public - declared}; declared, not public: {declared - public}"


@pytest.mark.parametrize("decl", registry.declarations(), ids=lambda d: d.name)
def test_declaration_is_complete(decl):
    assert decl.reference is not None and decl.reference is not decl.fn
    shapes = {tuple(np.shape(x) for x in jax.tree.leaves(args)) for args in decl.examples(np.random.default_rng(0))}
    assert len(shapes) >= 2, f"{decl.name}: examples at fewer than two shapes"
    assert sum(c.declaration is decl for c in CASES) >= 2
    page = DOCS / f"{decl.family}.md"
    assert decl.section in _anchors(page), f"{decl.name}: no section #{decl.section} in {page.name}"
    assert f"`jb.{decl.name}`" in registry.markdown_table()
    if decl.layer is not None:
        layer = getattr(combinators, decl.layer)
        assert callable(layer) or isinstance(layer, combinators.Layer)
    assert decl.cores, f"{decl.name}: which hand-written rules does it run?"


def test_generated_layers_apply_their_module():
    """Each registry layer (``Elu``, ``LeakyRelu``, ``LayerNormS``, ``ResidualBlock``, …) inits
    parameters of the module's shapes and applies the module itself."""
    z = jnp.linspace(-2.0, 2.0, 6)
    for decl in registry.declarations():
        if decl.layer is None or decl.layer in combinators._HAND_WRITTEN:
            continue
        layer = getattr(combinators, decl.layer)
        params = layer.init(jax.random.PRNGKey(0), z.shape)
        out = layer.apply(params, z)
        expected = decl.fn(*(((params,) if params != () else ()) + (z,)))
        chex.assert_trees_all_equal(out, expected)
    elu = combinators.layer(jb.elu, alpha=0.5)
    chex.assert_trees_all_equal(elu.apply((), z), jb.elu(z, alpha=0.5))
    with pytest.raises(TypeError, match="has no layer"):
        combinators.layer(jb.mse_loss)
    with pytest.raises(TypeError, match="combinators.Dense"):
        combinators.layer(jb.mm)

"""JAX's dtype contract, for every declared module, as a matrix from the registry.

For every module and model × input configuration (float16, bfloat16, float32, float64; mixed
parameter/input dtypes; weak-typed Python-float parameters) × transformation (eager, ``jit``,
``vmap``, ``grad``, ``vmap(grad)``, a ``lax.scan`` of SGD steps (traced: ``grad`` under
compilation), ``grad`` of ``checkpoint``, ``jvp``): the outputs and every cotangent have exactly the shapes, dtypes and weak types
that the same transformation of the pure-jnp reference gives (JAX's promotion), and are finite.
In float64 the values also equal the reference's. Then the examples that once broke this
contract, each as a test.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from jbackprop.check.cases import cast_case
from jbackprop.modules import registry

TRANSFORMS = ["eager", "jit", "vmap", "grad", "vmap(grad)", "scan", "grad(checkpoint)", "jvp"]


def _is_container(a):
    return isinstance(a, (dict, list, tuple))


def _first_case_per_module():
    seen = {}
    for case in registry.cases():
        seen.setdefault(case.declaration.name, case)
    return list(seen.values())


def _scalar_case(decl):
    """The first declared example with a scalar float leaf (for the weak-type configuration)."""
    for case in registry.cases():
        if case.declaration is decl and any(
                np.ndim(x) == 0 and np.issubdtype(np.asarray(x).dtype, np.floating)
                for i, a in enumerate(case.args) if i in case.options["argnums"]
                for x in jax.tree.leaves(a)):
            return case
    return None


def _configs():
    """``(id, case, cast)`` where ``cast(args)`` gives the configuration's arguments."""
    out = []
    for case in _first_case_per_module():
        for dtype in ("float16", "bfloat16", "float32", "float64"):
            out.append((f"{case.name}-{dtype}", case, functools.partial(cast_case, dtype=dtype)))
        if len(case.options["argnums"]) > 1:            # parameters and data in two dtypes
            for first, second in (("float32", "float64"), ("float64", "float32")):
                out.append((f"{case.name}-{first}+{second}", case,
                            functools.partial(_mixed, dtypes=(first, second))))
        weak = _scalar_case(case.declaration)
        if weak is not None:
            out.append((f"{weak.name}-weak", weak, _weak))
    return out


def _mixed(args, dtypes):
    """The first float argument in ``dtypes[0]``, the others in ``dtypes[1]``."""
    return tuple(cast_case(a, dtypes[0] if i == 0 else dtypes[1]) for i, a in enumerate(args))


def _weak(args):
    """Scalar float leaves as Python floats (weak-typed); every other float leaf float16."""
    def leaf(x):
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            return jnp.asarray(x)
        return float(x) if x.ndim == 0 else jnp.asarray(x, jnp.float16)
    return tuple(jax.tree.map(leaf, a) for a in args)


def _total(fn):
    """A scalar of ``fn``'s output, summed in the output's own dtype (no cast to hide a bug)."""
    return lambda *a: sum(jnp.sum(o) for o in jax.tree.leaves(fn(*a)))


def _transformed(name, fn, args, argnums):
    """``name`` applied to ``fn`` at ``args``: a callable of no arguments."""
    batch = tuple(i for i, a in enumerate(args) if not _is_container(a))
    in_axes = tuple(0 if i in batch else None for i in range(len(args)))
    stacked = tuple(jax.tree.map(lambda x: jnp.stack([jnp.asarray(x), jnp.asarray(x)]), a)
                    if i in batch else a for i, a in enumerate(args))
    grad = jax.grad(_total(fn), argnums)
    if name == "eager":
        return lambda: fn(*args)
    if name == "jit":
        return lambda: jax.jit(fn)(*args)
    if name == "vmap":
        return lambda: jax.vmap(fn, in_axes)(*stacked)
    if name == "grad":
        return lambda: grad(*args)
    if name == "vmap(grad)":
        return lambda: jax.vmap(grad, in_axes)(*stacked)
    if name == "grad(checkpoint)":
        return lambda: jax.grad(_total(jax.checkpoint(fn)), argnums)(*args)
    if name == "jvp":   # forward mode: the tangent in every differentiated argument at once
        def of_diff(*diff):
            full = list(args)
            for i, d in zip(argnums, diff):
                full[i] = d
            return fn(*full)
        primals = tuple(args[i] for i in argnums)
        return lambda: jax.jvp(of_diff, primals, jax.tree.map(jnp.ones_like, primals))
    assert name == "scan"

    def sgd(carry, _):  # the differentiable arguments are the carry: dtypes must not drift
        full = list(args)
        for i, c in zip(argnums, carry):
            full[i] = c
        g = grad(*full)
        return jax.tree.map(lambda c, gi: c - 0.01 * gi, carry, g), None
    return lambda: jax.lax.scan(sgd, tuple(args[i] for i in argnums), None, length=2)[0]


def _signature(tree):
    return jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a).name,
                                   bool(getattr(a, "weak_type", isinstance(a, float)))), tree)


CONFIGS = _configs()


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("config_id, case, cast", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_dtype_contract(config_id, case, cast, transform):
    args = cast(case.args)
    argnums = case.options["argnums"]
    run = _transformed(transform, case.fn, args, argnums)
    expected = jax.eval_shape(_transformed(transform, case.reference, args, argnums))
    got = run()
    assert _signature(got) == _signature(expected), \
        f"{config_id} under {transform}: got {_signature(got)}, the reference gives {_signature(expected)}"
    for leaf in jax.tree.leaves(got):
        assert bool(jnp.all(jnp.isfinite(leaf))), f"{config_id} under {transform}: not finite"
    if config_id.endswith("-float64"):
        chex.assert_trees_all_close(got, jax.jit(_transformed(transform, case.reference, args, argnums))(),
                                    rtol=1e-10, atol=1e-12)


# --- the examples that once broke the contract -------------------------------------------------
P32 = {"W": jnp.ones((3, 4), jnp.float32), "b": jnp.ones(3, jnp.float32)}


def test_float32_parameters_with_float64_input_get_float32_gradients():
    g = jax.grad(lambda p: jnp.sum(jb.mm(p, jnp.ones(4))))(P32)           # z float64 (x64)
    chex.assert_type([g["W"], g["b"]], jnp.float32)
    g_ref = jax.grad(lambda p: jnp.sum(ref.mm(p, jnp.ones(4))))(P32)
    chex.assert_trees_all_close(g, g_ref)
    P64 = jax.tree.map(lambda a: a.astype(jnp.float64), P32)
    z_bar = jax.grad(lambda z: jnp.sum(jb.mm(P64, z)))(jnp.ones(4, jnp.float32))
    chex.assert_type(z_bar, jnp.float32)
    chex.assert_trees_all_close(z_bar, jnp.full(4, 3.0, jnp.float32))


@pytest.mark.parametrize("module", ["mm", "residual"])
def test_scan_sgd_over_float32_parameters_and_float64_data(module):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 3)))          # float64
    if module == "mm":
        params, f = {"W": jnp.ones((2, 3), jnp.float32), "b": jnp.zeros(2, jnp.float32)}, jb.mm
    else:
        sq = {"W": 0.1 * jnp.eye(3, dtype=jnp.float32), "b": jnp.zeros(3, jnp.float32)}
        params, f = {"mm1": sq, "mm2": sq}, jb.residual

    def step(p, xi):
        g = jax.grad(lambda p: jnp.sum(f(p, xi) ** 2))(p)
        return jax.tree.map(lambda a, b: a - 0.01 * b, p, g), None
    out = jax.jit(lambda p: jax.lax.scan(step, p, x)[0])(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, params)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_weak_typed_layer_norm_parameters_keep_the_input_dtype(dtype):
    params = {"beta": 0.0, "gamma": 1.0}
    z = jnp.asarray([1.0, 2.0, 4.0], dtype)
    for out in (jax.jit(jb.layer_norm)(params, z),
                jax.jit(jax.vmap(jb.layer_norm, (None, 0)))(params, jnp.stack([z, 2 * z]))[0]):
        chex.assert_type(out, dtype)
        chex.assert_trees_all_close(out.astype(jnp.float32), ref.layer_norm_s(z.astype(jnp.float32)),
                                    atol=1e-2)

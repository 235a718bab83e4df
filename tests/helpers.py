"""Shared gradient checks for the test-suite: every comparison is against something independent
(``jax.grad`` of the pure-jnp reference in ``jbackprop.reference``, or float64 central finite
differences), never the hand-written backward against itself."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

REL = 1e-10  # float64: hand-written backward vs autodiff of the reference


def assert_close(actual, expected, rel=REL, what=""):
    """Leaf-wise |a − e| ≤ rel · (|e| + max|e|): relative, robust to zeros in ``e``."""
    la, ta = jax.tree.flatten(actual)
    le, te = jax.tree.flatten(expected)
    assert ta == te, f"{what}: tree structures differ: {ta} vs {te}"
    for a, e in zip(la, le):
        a, e = np.asarray(a, dtype=np.float64), np.asarray(e, dtype=np.float64)
        assert a.shape == e.shape, f"{what}: shapes differ: {a.shape} vs {e.shape}"
        scale = np.max(np.abs(e), initial=0.0) + np.finfo(np.float64).tiny
        np.testing.assert_allclose(a, e, rtol=rel, atol=rel * scale, err_msg=what)


def _weights(out, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), jnp.shape(out), jnp.result_type(out))


def _is_float(a):
    return all(jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) for x in jax.tree.leaves(a))


def check_module(fn, ref, args, *, argnums=None, kwargs=None, batch=(), fd_rel=1e-6,
                 check_jaxpr=True):
    """Check module ``fn`` against reference ``ref`` at ``args`` (float64).

    * forward equals the reference;
    * ``jax.grad`` through ``fn`` (the hand-written rule) equals ``jax.grad`` of ``ref``;
    * the notes-form ``fn.backward(*args, v=v)`` equals ``jax.vjp`` of ``ref``;
    * the same under ``jax.jit``;
    * central finite differences along a random direction agree;
    * the gradient's jaxpr goes through ``custom_vjp`` with the module's own ``bwd``;
    * for ``batch`` (argnums of per-example data): ``jax.vmap`` forward, ``jax.grad`` of a
      vmapped sum, and per-example ``jax.vmap(jax.grad(...))`` agree with the reference.
    """
    kwargs = kwargs or {}
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args) if _is_float(a))
    f = lambda *a: fn(*a, **kwargs)
    r = lambda *a: ref(*a, **kwargs)

    out, out_ref = f(*args), r(*args)
    assert_close(out, out_ref, 1e-12, "forward vs reference")
    c = _weights(out_ref)
    J = lambda *a: jnp.sum(c * f(*a))
    Jr = lambda *a: jnp.sum(c * r(*a))
    g_ref = jax.jit(jax.grad(Jr, argnums))(*args)
    assert_close(jax.grad(J, argnums)(*args), g_ref, what="jax.grad vs autodiff of reference")
    assert_close(jax.jit(jax.grad(J, argnums))(*args), g_ref, what="jit(grad)")

    if hasattr(fn, "backward"):  # a module (models are compositions of modules)
        expected = jax.vjp(r, *args)[1](c)
        got = fn.backward(*args, v=c, **kwargs)
        for i in argnums:
            assert_close(got[i], expected[i], what=f"notes-form backward, argument {i}")

    # central differences in float64 along a random direction (all float arguments at once)
    key = jax.random.PRNGKey(7)
    dirs = [jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype),
                         args[i]) for i in argnums]
    g = jax.jit(jax.grad(J, argnums))(*args)
    slope = sum(jnp.vdot(jax.tree.leaves(gi)[j], jax.tree.leaves(di)[j])
                for gi, di in zip(g, dirs) for j in range(len(jax.tree.leaves(gi))))
    h = 1e-6

    @jax.jit
    def shifted(s):
        a = list(args)
        for i, d in zip(argnums, dirs):
            a[i] = jax.tree.map(lambda x, dx: x + s * h * dx, a[i], d)
        return J(*a)
    fd = (shifted(1.0) - shifted(-1.0)) / (2 * h)
    assert abs(float(fd - slope)) <= fd_rel * (abs(float(slope)) + 1.0), \
        f"finite differences {float(fd)} vs hand-written {float(slope)}"

    if check_jaxpr:
        assert_runs_hand_written_rule(fn, J, args, argnums)

    if batch:
        _check_vmap(f, r, args, argnums, batch)


def assert_runs_hand_written_rule(fn, J, args, argnums):
    """The forward's jaxpr goes through the module's ``custom_vjp`` core (directly, or via the
    ``jbackprop_call`` batching dispatch), and ``jax.grad`` really calls the core's ``bwd``."""
    core = fn.core
    text = str(jax.make_jaxpr(J)(*args))
    assert (f"name={core.__name__}" in text and "custom_vjp_call" in text) or \
        f"call={core.__name__}" in text, f"{core.__name__} is not in the jaxpr:\n{text}"
    calls, bwd = [], core.bwd

    def spy(*a):
        calls.append(1)
        return bwd(*a)
    core.bwd = spy
    try:
        jax.jit(jax.grad(J, argnums))(*args)
    finally:
        core.bwd = bwd
    assert calls, f"jax.grad did not call the hand-written {bwd.__name__}"


def _check_vmap(f, r, args, argnums, batch):
    def stack(a):
        if not _is_float(a):
            return jnp.stack([a, a, a])
        return jax.tree.map(lambda x: jnp.stack([x, 0.7 * x + 0.3, -x]), a)
    bargs = [stack(a) if i in batch else a for i, a in enumerate(args)]
    in_axes = tuple(0 if i in batch else None for i in range(len(args)))
    out, out_ref = jax.jit(jax.vmap(f, in_axes))(*bargs), jax.jit(jax.vmap(r, in_axes))(*bargs)
    assert_close(out, out_ref, 1e-12, "vmap forward")
    c = _weights(out_ref, seed=3)
    J = lambda *a: jnp.sum(c * jax.vmap(f, in_axes)(*a))
    Jr = lambda *a: jnp.sum(c * jax.vmap(r, in_axes)(*a))
    assert_close(jax.jit(jax.grad(J, argnums))(*bargs), jax.jit(jax.grad(Jr, argnums))(*bargs),
                 what="grad of vmap")
    per = lambda g: jax.vmap(jax.grad(lambda *a: jnp.sum(a[-1] * g(*a[:-1])), argnums),
                             in_axes + (0,))
    assert_close(jax.jit(per(f))(*bargs, c), jax.jit(per(r))(*bargs, c),
                 what="vmap(grad): per-example")

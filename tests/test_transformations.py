"""Every module and model of the library (the cases of ``jbackprop check``) under
``jax.checkpoint`` and ``jax.lax.scan``, and run in bfloat16."""
import jax
import jax.numpy as jnp
import pytest

from jbackprop.check_cases import library_cases
from helpers import assert_close

CASES = [c[:4] for c in library_cases() if c[0].endswith("]") and "16" not in c[0]]  # one shape each


def _loss(fn, args):
    out = jax.eval_shape(fn, *args)
    c = jax.random.normal(jax.random.PRNGKey(1), out.shape, out.dtype)
    return lambda *a: jnp.sum(c * fn(*a).astype(c.dtype))


def _argnums(args):
    return tuple(i for i, a in enumerate(args)
                 if all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(a)))


@pytest.mark.parametrize("name, fn, ref, args", CASES, ids=[c[0] for c in CASES])
def test_checkpoint_and_scan(name, fn, ref, args):
    argnums = _argnums(args)
    expected = jax.jit(jax.grad(_loss(ref, args), argnums))(*args)
    ckpt = jax.grad(_loss(jax.checkpoint(fn), args), argnums)
    assert_close(jax.jit(ckpt)(*args), expected, what="checkpoint")

    def scanned(*a):  # the module inside a scan body, applied to the same inputs twice
        step = lambda carry, _: (carry + _loss(fn, args)(*a), None)
        return jax.lax.scan(step, jnp.zeros((), jnp.float64), None, length=2)[0] / 2
    assert_close(jax.jit(jax.grad(scanned, argnums))(*args), expected, what="scan")


@pytest.mark.parametrize("name, fn, ref, args", CASES, ids=[c[0] for c in CASES])
def test_bfloat16_runs(name, fn, ref, args):
    args = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, args)
    argnums = _argnums(args)
    out = jax.jit(fn)(*args)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums))(*args)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
    for g in jax.tree.leaves(grads):
        assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g)))

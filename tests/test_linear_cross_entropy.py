"""The fused MM + cross-entropy beyond the registry's cases (tests/test_registry.py verifies it in
both modes, float32 and float64, with blocks of 4 rows that do not divide the 10 rows): other
block sizes against the unfused modules and the reference, the memory contract (no
rows × classes temporary), labels out of range, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from jbackprop.testing import assert_jvp_correct, assert_vjp_correct
from helpers import assert_close

K, M = 13, 6


def _data(rows=(3, 7), bias=True, seed=0):
    rng = np.random.default_rng(seed)
    params = {"W": rng.standard_normal((K, M))}
    if bias:
        params["b"] = rng.standard_normal(K)
    return params, rng.standard_normal((*rows, M)), rng.integers(0, K, rows).astype(np.int32)


@pytest.mark.parametrize("chunk_size", [1, 3, 21, 512])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_cross_entropy_of_mm(chunk_size, bias):
    """Any block size (one row, not dividing the 21 rows, exactly 21, more than all): the loss
    and the gradient equal ``cross_entropy_loss(mm(params, z), y)`` differentiated by JAX
    through the reference."""
    params, z, y = _data(bias=bias)
    fused = lambda p, z: jb.linear_cross_entropy(p, z, y, chunk_size=chunk_size)
    unfused = lambda p, z: jax.vmap(jax.vmap(
        lambda zi, yi: ref.cross_entropy_loss(ref.mm(p, zi), yi)))(z, y)
    assert_close(fused(params, z), unfused(params, z), what="loss")
    w = np.random.default_rng(1).standard_normal(y.shape)
    grad = lambda f: jax.grad(lambda p, z: jnp.sum(w * f(p, z)), (0, 1))(params, z)
    assert_close(grad(fused), grad(unfused), what="gradient")


def test_through_the_checker_with_one_row_blocks():
    """Blocks of one row without a bias: every check of the checker, both modes."""
    params, z, y = _data((5,), bias=False)
    fn = lambda p, z: jb.linear_cross_entropy(p, z, y, chunk_size=1)
    reference = lambda p, z: ref.linear_cross_entropy(p, z, y)
    assert_vjp_correct(fn, params, z, reference=reference, name="linear_cross_entropy chunk 1")
    assert_jvp_correct(fn, params, z, reference=reference, name="linear_cross_entropy chunk 1")


def test_no_temporary_holds_all_logits():
    """The compiled forward + backward never holds the (rows × classes) logits: its temporary
    memory (XLA's ``memory_analysis``) is under a quarter of one such array, whereas
    ``jax.grad`` of the unfused reference needs more than one."""
    rows, k, m, chunk = 1024, 2048, 16, 64
    rng = np.random.default_rng(2)
    params = {"W": jnp.asarray(rng.standard_normal((k, m)), jnp.float32),
              "b": jnp.zeros(k, jnp.float32)}
    z = jnp.asarray(rng.standard_normal((rows, m)), jnp.float32)
    y = jnp.asarray(rng.integers(0, k, rows), jnp.int32)
    logits_bytes = rows * k * 4

    def temp(loss):
        grad = jax.jit(jax.grad(lambda p, z: jnp.mean(loss(p, z, y)), (0, 1)))
        return grad.lower(params, z).compile().memory_analysis().temp_size_in_bytes
    fused = temp(lambda p, z, y: jb.linear_cross_entropy(p, z, y, chunk_size=chunk))
    unfused = temp(ref.linear_cross_entropy)
    assert unfused > logits_bytes, (unfused, logits_bytes)
    assert fused < logits_bytes / 4, (fused, logits_bytes)


def test_traced_label_out_of_range_gives_nan_rows():
    """Under ``jax.jit`` a label outside ``0..k−1`` makes that row's loss and ``z̄`` NaN (and so
    ``W̄``); the other rows are untouched."""
    params, z, y = _data((4,))
    y = y.copy()
    y[2] = K
    loss = jax.jit(lambda p, z, y: jb.linear_cross_entropy(p, z, y, chunk_size=2))(params, z, y)
    assert np.isnan(loss[2]) and np.isfinite(np.delete(np.asarray(loss), 2)).all()
    z_bar = jax.jit(jax.grad(lambda z, y: jnp.sum(jb.linear_cross_entropy(params, z, y))))(z, y)
    assert np.isnan(z_bar[2]).all() and np.isfinite(np.delete(np.asarray(z_bar), 2, 0)).all()


@pytest.mark.parametrize("change, exc, match", [
    (lambda p, z, y: (p, z, y.astype(np.float32)), TypeError, "integer"),
    (lambda p, z, y: (p, z, y + K), ValueError, r"y must be in 0\.\.12"),
    (lambda p, z, y: (p, z, y[:, :3]), ValueError, r"y must have shape z.shape\[:-1\]"),
    (lambda p, z, y: (p, z[..., :4], y), ValueError, r"needs z \(\.\.\., 6\)"),
    (lambda p, z, y: ({**p, "b": p["b"][:3]}, z, y), ValueError, r"params\['b'\] \(13,\)"),
    (lambda p, z, y: ({"W": p["W"][0]}, z, y), ValueError, "params\\['W'\\]"),
    (lambda p, z, y: ({"w": p["W"]}, z, y), ValueError, "keys"),
], ids=["float labels", "label out of range", "label shape", "z width", "b shape", "W rank",
        "keys"])
def test_bad_input(change, exc, match):
    with pytest.raises(exc, match=match):
        jb.linear_cross_entropy(*change(*_data()))


@pytest.mark.parametrize("chunk_size", [0, -2, 2.5, True, "4"])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be an integer ≥ 1"):
        jb.linear_cross_entropy(*_data(), chunk_size=chunk_size)

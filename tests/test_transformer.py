"""Embedding and the Transformer beyond the registry's cases (tests/test_registry.py and
tests/test_forward_mode.py verify both rules of each at two shapes in float32 and float64):
repeated and batched ids, traced ids out of range, a batch of sequences, the hand-written rules
under lax.scan, the sort dataset, and manual against autodiff training."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbackprop as jb
from jbackprop import reference as ref
from jbackprop.train import data
from jbackprop.train.loop import Config, make_loss, make_model, make_optimizer, train_step

F64 = {"rtol": 1e-12, "atol": 1e-12}


def test_embedding_gradient_adds_the_rows_of_repeated_ids():
    """Closed form: id 2 appears twice, so row 2 of Ē is the sum of both rows of v."""
    E = jnp.arange(12.0).reshape(4, 3)
    ids = jnp.array([2, 0, 2])
    v = jnp.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 5]])
    (E_bar,) = jax.vjp(lambda E: jb.embedding({"E": E}, ids), E)[1](v)
    chex.assert_trees_all_close(E_bar, jnp.array([[0, 1, 0], [0, 0, 0], [1, 0, 5], [0, 0, 0.0]]),
                                **F64)


def test_embedding_traced_ids_out_of_range_give_nan_rows_and_no_gradient():
    E = jnp.ones((4, 2))
    f = jax.jit(lambda E, ids: jb.embedding({"E": E}, ids))
    out = f(E, jnp.array([1, 4, -1]))
    assert bool(jnp.all(jnp.isfinite(out[0]))) and bool(jnp.all(jnp.isnan(out[1:])))
    g = jax.jit(jax.grad(lambda E, ids: jnp.sum(jb.embedding({"E": E}, ids)[0])))(E, jnp.array([1, 4]))
    chex.assert_trees_all_close(g, jnp.array([[0, 0], [1, 1], [0, 0], [0, 0.0]]), **F64)


def test_transformer_on_a_batch_of_sequences_equals_the_reference_per_sequence():
    params = jb.transformer_init(jax.random.PRNGKey(0), 7, 8, 2, 3, 6, jnp.float64)
    ids = jax.random.randint(jax.random.PRNGKey(1), (3, 6), 0, 7)
    chex.assert_trees_all_close(jb.transformer(params, ids),
                                jax.vmap(lambda i: ref.transformer(params, i))(ids), **F64)
    loss = lambda f: lambda p: jnp.mean(jax.vmap(lambda i: jnp.sum(
        jb.cross_entropy_loss(f(p, i[:-1]), i[1:])))(ids))
    chex.assert_trees_all_close(jax.jit(jax.grad(loss(jb.transformer)))(params),
                                jax.jit(jax.grad(loss(ref.transformer)))(params), **F64)


def test_transformer_compiles_flat_in_depth():
    """The blocks run in one lax.scan: the jaxpr does not grow with depth."""
    size = lambda depth: len(jax.make_jaxpr(jb.transformer)(
        jb.transformer_init(jax.random.PRNGKey(0), 5, 8, 2, depth, 4), jnp.arange(4)).eqns)
    assert size(2) == size(12)


def test_sort_dataset():
    ds = data.sort()
    assert ds.x_train.shape[1:] == (11,) and ds.task == "sequence" and ds.num_outputs == 5
    assert len(ds.x_train) + len(ds.x_test) == 5 ** 6
    train = {tuple(r) for r in ds.x_train[:, :6]}
    assert not train & {tuple(r) for r in ds.x_test[:, :6]}            # held out
    i = 123
    np.testing.assert_array_equal(ds.y_train[i, 5:], np.sort(ds.x_train[i, :6]))
    np.testing.assert_array_equal(ds.x_train[i, 6:], np.sort(ds.x_train[i, :6])[:-1])
    assert (ds.y_train[:, :5] == -1).all()


def test_manual_and_autodiff_training_agree_after_100_float32_steps():
    """The same transformer, the same batches: hand-written rules against jax.grad of the
    reference, 100 AdamW steps in float32, parameters equal to 1e-5."""
    ds = data.sort()
    x, y = jnp.asarray(ds.x_train[:64]), jnp.asarray(ds.y_train[:64])
    cfg = Config(model="transformer", dataset="sort", width=16, depth=2, heads=2, lr=3e-3,
                 weight_decay=0.0, input_noise=0.0, epochs=1)
    runs = []
    for backward in ("manual", "autodiff"):
        c = Config(**{**cfg.__dict__, "backward": backward})
        init, apply = make_model(c, x.shape[1:], ds.num_outputs)
        loss, opt = make_loss(apply, "sequence", backward), make_optimizer(c, 100)
        params = init(jax.random.PRNGKey(0))

        @jax.jit
        def run(params):
            def step(carry, i):
                idx = jax.random.permutation(jax.random.PRNGKey(i), 64)[:16]
                p, s, value = train_step(loss, opt, *carry, x[idx], y[idx])
                return (p, s), value
            return jax.lax.scan(step, (params, opt.init(params)), jnp.arange(100))
        (params, _), losses = run(params)
        runs.append((params, losses))
    assert float(runs[0][1][-1]) < 0.8 * float(runs[0][1][0])          # it learns
    chex.assert_trees_all_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-5)


def test_errors_name_the_argument():
    params = jb.transformer_init(jax.random.PRNGKey(0), 5, 8, 2, 1, 4)
    with pytest.raises(ValueError, match=r"1 ≤ n ≤ max_len = 4, got \(6,\)"):
        jb.transformer(params, jnp.arange(6) % 5)
    with pytest.raises(ValueError, match=r"ids must be in 0..4"):
        jb.transformer(params, jnp.array([0, 5]))
    with pytest.raises(TypeError, match="ids must be an integer class index"):
        jb.embedding({"E": jnp.ones((3, 2))}, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="d_model=8 is not divisible by num_heads=3"):
        jb.transformer_init(jax.random.PRNGKey(0), 5, 8, 3, 1, 4)
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        jb.transformer_init(jax.random.PRNGKey(0), 5, 8, 2, 0, 4)
    with pytest.raises(ValueError, match="params must come from transformer_init"):
        jb.transformer({"embed": params["embed"]}, jnp.arange(3))

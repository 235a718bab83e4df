"""Run by ``tests/test_distributed.py`` in a fresh process that sees 4 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``): the pytest process has already started
JAX with one. Prints one JSON object of measured facts; the test makes the assertions.

* ``data_parallel``: 50 Adam steps of an MLP on the digits, ``train.train_epoch`` jit-compiled
  on one device against ``distributed.data_parallel_epoch`` on 4, in float32 and float64; the
  sharding of the mini-batch inside the step, of the parameters after it, and the all-reduces
  in the compiled program.
* ``step``: ``data_parallel_step`` on a batch placed by ``shard_batch``, against one device.
* ``model_parallel``: gradients of an MLP whose layers are split over ``"model"`` (on a 1×4
  and a 2×2 mesh), against one device and against ``jax.grad`` of the pure-jnp reference; the
  sharding of ``W`` seen inside the hand-written backward and of the gradients.
* ``errors``: the messages of the refused configurations.

With ``--process I PORT ARGS...`` it is instead process ``I`` of 2 (2 CPU devices each) joined
by ``jax.distributed.initialize``, running ``jbackprop ARGS...``.
"""
import contextlib
import functools
import io
import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import jbackprop as jb
from jbackprop import cli, reference, train
from jbackprop.train import data, distributed as dist
from jbackprop.train import Config, TrainState

STEPS, BATCH, NOISE = 50, 32, 0.3


def rel_diff(a, b):
    """max over leaves of max|a − b| / max|b|."""
    return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)))
                     / np.max(np.abs(np.asarray(v, np.float64))))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def spec(sharding, ndim):
    """The mesh axis (or None) of each array axis: ``P("model")`` of a matrix is ``["model", None]``."""
    names = list(sharding.spec)
    return names + [None] * (ndim - len(names))


@functools.lru_cache
def digits():
    return data.digits()


def digits_problem(dtype):
    ds = digits()
    x, y = jnp.asarray(ds.x_train[:320], dtype), jnp.asarray(ds.y_train[:320])  # 10 steps/epoch
    cfg = Config(model="mlp", width=64)
    init, apply = train.make_model(cfg, x.shape[1:], ds.num_outputs)
    loss = train.make_loss(apply, ds.task, cfg.backward)
    opt = train.make_optimizer(cfg, STEPS)
    params = jax.tree.map(lambda a: a.astype(dtype), init(jax.random.PRNGKey(0)))
    return x, y, loss, opt, TrainState(params, opt.init(params), jnp.zeros((), jnp.int32))


def side_by_side(one, four, s1, s4, x, y):
    """``STEPS // 10`` epochs of ``one(state, key)`` (one device) and ``four(state, x, y, key)``
    (the mesh) from the same keys: the final states and the step losses of each."""
    l1, l4 = [], []
    for e in range(STEPS // 10):
        key = jax.random.PRNGKey(e)
        s1, a = one(s1, key)
        s4, b = four(s4, x, y, key)
        l1.append(a)
        l4.append(b)
    return s1, s4, np.concatenate(l1), np.concatenate(l4)


def data_parallel(dtype):
    x, y, loss, opt, state0 = digits_problem(dtype)
    seen = []

    def spied_loss(params, xb, yb):  # records the sharding of the mini-batch inside the step
        jax.debug.inspect_array_sharding(xb, callback=seen.append)
        return loss(params, xb, yb)

    one = jax.jit(lambda s, k: train.train_epoch(loss, opt, s, x, y, k, BATCH, NOISE))
    mesh = dist.make_mesh(4)
    s4 = dist.replicate(state0, mesh)
    four = dist.data_parallel_epoch(spied_loss, opt, mesh, BATCH, NOISE).lower(
        s4, x, y, jax.random.PRNGKey(0)).compile()      # compiled once, ahead of time
    s1, s4, l1, l4 = side_by_side(one, four, state0, s4, x, y)
    hlo = four.as_text()
    leaves = jax.tree.leaves(s4.params)
    return {"steps": len(l4),
            "loss_rel": float(np.max(np.abs(l4 - l1) / np.abs(l1))),
            "param_rel": rel_diff(s4.params, s1.params),
            "loss_first_last": [float(l4[0]), float(l4[-1])],
            "batch_spec": spec(seen[0], 2), "batch_shard_shape": list(seen[0].shard_shape((BATCH, 64))),
            "params_replicated": all(p.sharding.is_fully_replicated for p in leaves),
            "params_devices": sorted({len(p.sharding.device_set) for p in leaves}),
            "all_reduces": hlo.count("all-reduce(")}


def model_parallel_training(dtype):
    """50 Adam steps of the digits MLP (width 64) on a 2 × 2 mesh (data × model), parameters
    and Adam's moments split Megatron-style, against the same epochs on one device."""
    x, y, loss, opt, state0 = digits_problem(dtype)
    mesh = dist.make_mesh(4, model=2)
    shardings = dist.state_shardings(state0, mesh, dist.mlp_shardings(state0.params, mesh))
    one = jax.jit(lambda s, k: train.train_epoch(loss, opt, s, x, y, k, BATCH, NOISE))
    four = dist.model_parallel_epoch(loss, opt, mesh, BATCH, shardings, NOISE)
    s1, s4, l1, l4 = side_by_side(one, four, state0, jax.device_put(state0, shardings), x, y)
    first = s4.params[0]["W"]
    return {"steps": len(l4), "loss_rel": float(np.max(np.abs(l4 - l1) / np.abs(l1))),
            "param_rel": rel_diff(s4.params, s1.params),
            "loss_first_last": [float(l4[0]), float(l4[-1])],
            "W0_spec": spec(first.sharding, 2),
            "W0_shard_shape": list(first.addressable_shards[0].data.shape),
            "mu_W0_spec": spec(s4.opt_state[0].mu[0]["W"].sharding, 2)}


def step():
    x, y, loss, opt, s = digits_problem(jnp.float64)
    mesh = dist.make_mesh(4)
    xb, yb = dist.shard_batch(mesh, x[:BATCH], y[:BATCH])
    p4, _, v4 = dist.data_parallel_step(loss, opt, mesh)(*dist.replicate((s.params, s.opt_state), mesh), xb, yb)
    p1, _, v1 = jax.jit(lambda p, o, a, b: train.train_step(loss, opt, p, o, a, b))(
        s.params, s.opt_state, x[:BATCH], y[:BATCH])
    return {"xb_spec": spec(xb.sharding, 2),
            "xb_shards": [list(sh.data.shape) for sh in xb.addressable_shards],
            "xb_shard_devices": len({sh.device for sh in xb.addressable_shards}),
            "loss_rel": abs(float(v4) - float(v1)) / abs(float(v1)), "param_rel": rel_diff(p4, p1)}


def model_parallel(data_axis, model_axis):
    mesh = dist.make_mesh(data_axis * model_axis, model=model_axis)
    params = jb.mlp_init(jax.random.PRNGKey(0), [8, 16, 12, 16, 5], jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 8), jnp.float64)
    y = jnp.arange(8) % 5

    def loss(p, x, y, net=jb.mlp, xent=jb.cross_entropy_loss):
        return jnp.mean(jax.vmap(xent)(jax.vmap(net, (None, 0))(p, x), y))

    core, bwd, seen = jb.mm.core, jb.mm.core.bwd, []

    def spied_bwd(res, v):  # the hand-written B[MM, ·]: record the sharding of its W
        jax.debug.inspect_array_sharding(res[0], callback=lambda s: seen.append(spec(s, 2)))
        return bwd(res, v)
    core.bwd = spied_bwd
    try:
        sharded = dist.shard_mlp(params, mesh)
        (xs,) = dist.shard_batch(mesh, x)
        g = jax.jit(jax.grad(loss))(sharded, xs, y)
    finally:
        core.bwd = bwd
    g1 = jax.jit(jax.grad(loss))(params, x, y)  # one device, no annotations
    g_ref = jax.jit(jax.grad(lambda p, x, y: loss(p, x, y, reference.mlp, reference.cross_entropy_loss)))(
        params, x, y)
    return {"mesh": dict(mesh.shape),
            "W_specs": [spec(layer["W"].sharding, 2) for layer in sharded],
            "b_specs": [spec(layer["b"].sharding, 1) for layer in sharded],
            "W_shards": [list(layer["W"].addressable_shards[0].data.shape) for layer in sharded],
            "grad_W_specs": [spec(layer["W"].sharding, 2) for layer in g],
            "grad_W_shards": [list(layer["W"].addressable_shards[0].data.shape) for layer in g],
            "bwd_W_specs": seen, "rel_vs_one_device": rel_diff(g, g1),
            "rel_vs_reference": rel_diff(g, g_ref)}


def error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def errors():
    x, y, loss, opt, s = digits_problem(jnp.float32)
    mesh = dist.make_mesh(4)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = cli.main(["train", "--dataset", "xor", "--epochs", "1", "--batch-size", "30",
                         "--devices", "4", "--no-progress", "--out", tempfile.mkdtemp()])
    return {"too_many": error(lambda: dist.make_mesh(5)),
            "model_not_dividing": error(lambda: dist.make_mesh(4, model=3)),
            "epoch_batch": error(lambda: dist.data_parallel_epoch(loss, opt, mesh, 30)),
            "shard_batch": error(lambda: dist.shard_batch(mesh, x[:30])),
            "step_batch": error(lambda: dist.data_parallel_step(loss, opt, mesh)(
                s.params, s.opt_state, x[:30], y[:30])),
            "mlp_width": error(lambda: dist.mlp_shardings(
                jb.mlp_init(jax.random.PRNGKey(0), [8, 10, 5]), dist.make_mesh(4, model=4))),
            "cli_code": code, "cli_stderr": stderr.getvalue()}


def one_of_two_processes(process_id, port, argv):
    """``jbackprop train`` as one of 2 processes of 2 CPU devices each, joined by
    ``jax.distributed.initialize`` (as across 2 hosts): exits with the command's status."""
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
    return cli.main(argv)


if __name__ == "__main__" and sys.argv[1:2] == ["--process"]:   # --process I PORT train ...
    sys.exit(one_of_two_processes(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]))
elif __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)      # float64 beside float32 (explicit dtypes)
    print(json.dumps({"device_count": jax.device_count(),
                      "data_parallel": {"float32": data_parallel(jnp.float32),
                                        "float64": data_parallel(jnp.float64)},
                      "step": step(),
                      "model_parallel": [model_parallel(1, 4), model_parallel(2, 2)],
                      "model_parallel_training": {"float32": model_parallel_training(jnp.float32),
                                                  "float64": model_parallel_training(jnp.float64)},
                      "errors": errors()}))

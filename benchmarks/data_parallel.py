"""Time per epoch of data-parallel training (``jbackprop.train.distributed``) on 1, 2, 4 devices.

On a CPU the devices are forced host devices (``XLA_FLAGS=--xla_force_host_platform_device_count``,
set here before JAX starts unless already given): they share the machine's cores, so this
measures the overhead of the sharded program, not a speed-up. On a machine with several GPUs or
a TPU the same script times real devices (``--devices`` at most ``jax.device_count()``).

Each row: one compilation (reported), then the median wall-clock of ``--repeats`` epochs of
``data_parallel_epoch`` (``train_epoch`` with the mini-batch split over the devices); the
``plain`` row is ``train_epoch`` jit-compiled without a mesh.

    python benchmarks/data_parallel.py [--devices 1 2 4] [--repeats 20]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
ARGS.add_argument("--repeats", type=int, default=20)
ARGS.add_argument("--width", type=int, nargs="+", default=[256, 1024])
ARGS.add_argument("--batch-size", type=int, nargs="+", default=[32, 256])
args = ARGS.parse_args()
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={max(args.devices)}")

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402

from jbackprop import train  # noqa: E402
from jbackprop.train import data, distributed  # noqa: E402
from jbackprop.train import Config, TrainState  # noqa: E402


def time_rows(rows, repeats):
    """Compile each row once (timed), then run their epochs interleaved, one of each in turn,
    so that load on the machine falls on all of them alike; the median per row."""
    compile_s, times, states = [], [[] for _ in rows], []
    for name, epoch, state in rows:
        t = time.perf_counter()
        state, losses = epoch(state, jax.random.PRNGKey(0))
        losses.block_until_ready()
        compile_s.append(time.perf_counter() - t)
        states.append(state)
    for e in range(repeats):
        for i, (name, epoch, _) in enumerate(rows):
            t = time.perf_counter()
            states[i], losses = epoch(states[i], jax.random.PRNGKey(e + 1))
            losses.block_until_ready()
            times[i].append(time.perf_counter() - t)
    return compile_s, [statistics.median(t) for t in times]


def main() -> int:
    ds = data.digits()
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices "
          f"({jax.devices()[0].device_kind}), {os.cpu_count()} cores; digits, "
          f"{len(x)} training examples, MLP 64 → width → width → 10, AdamW, input noise 0.6")
    print(f"{'width':>6} {'batch':>6} {'steps':>6} {'devices':>8} {'compile s':>10} {'ms/epoch':>9}")
    for width in args.width:
        for batch in args.batch_size:
            cfg = Config(width=width, batch_size=batch)
            init, apply = train.make_model(cfg, x.shape[1:], ds.num_outputs)
            loss = train.make_loss(apply, ds.task, cfg.backward)
            opt = train.make_optimizer(cfg, 1000)
            params = init(jax.random.PRNGKey(0))
            state = TrainState(params, opt.init(params), jnp.zeros((), jnp.int32))
            rows = [("plain", jax.jit(lambda s, k: train.train_epoch(
                loss, opt, s, x, y, k, batch, cfg.input_noise)), state)]
            for n in args.devices:
                mesh = distributed.make_mesh(n)
                f = distributed.data_parallel_epoch(loss, opt, mesh, batch, cfg.input_noise)
                xs, ys = distributed.replicate((x, y), mesh)
                rows.append((str(n), lambda s, k, f=f, xs=xs, ys=ys: f(s, xs, ys, k),
                             distributed.replicate(state, mesh)))
            for (name, _, _), compile_s, per_epoch in zip(rows, *time_rows(rows, args.repeats)):
                print(f"{width:>6} {batch:>6} {len(x) // batch:>6} {name:>8} {compile_s:>10.2f} "
                      f"{1e3 * per_epoch:>9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scaling out on JAX's own sharding: data parallelism and model-parallel MLPs.

Nothing here is hand-written communication. A ``jax.sharding.Mesh`` of devices with axes
``("data", "model")``, ``NamedSharding`` annotations on the arrays, and ``jax.jit``: XLA's SPMD
partitioner splits the computation, and inserts the collectives (the all-reduce that sums the
gradient over the devices, the one that completes a row-sharded matrix product). The
gradients are still computed by the modules' hand-written backwards (``custom_vjp`` rules),
now on each device's shard.

* **Data parallel.** The mini-batch ``X ∈ R^{B×d}`` is split along its rows,
  ``P("data")``: each of ``D`` devices holds ``B/D`` examples. Parameters and optimiser state
  are replicated, ``P()``. The loss is the mean over the batch, so its gradient
  ``(1/B) Σ_k ∇J^{(k)}`` is a sum of per-device partial sums, which XLA all-reduces; every
  device then applies the same optax update. ``data_parallel_epoch`` runs
  ``train.train_epoch`` (Algorithm 2) this way, ``data_parallel_step`` one ``train.train_step``.
* **Model parallel (an MLP, Megatron-style).** In a pair of layers, the first ``W ∈ R^{n×m}``
  is split along its output dimension, ``P("model", None)`` (and its bias ``P("model")``), so
  each device computes ``n/M`` hidden units; the next layer's ``W' ∈ R^{n'×n}`` is split along
  its input dimension, ``P(None, "model")``, so each device contracts its own hidden units and
  XLA all-reduces the partial products. In the backward, ``B[MM, W](v) = v zᵀ`` comes out
  sharded like ``W`` with no communication. ``mlp_shardings`` gives these annotations,
  ``shard_mlp`` places the parameters.

The mesh axes are ``AxisType.Auto`` (sharding propagated by the compiler from the
annotations), which is what ``with_sharding_constraint`` and ``jit``'s ``in_shardings`` drive.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jbackprop.train.loop import train_epoch, train_step

DATA, MODEL = "data", "model"


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"make_mesh: {name} must be a positive integer, got {value!r}")
    return value


def make_mesh(devices: int | None = None, model: int = 1) -> Mesh:
    """A ``Mesh`` of the first ``devices`` devices, shaped ``(devices // model, model)`` with
    axes ``("data", "model")``.

    ``model = 1`` (the default) is pure data parallelism: ``("data": devices, "model": 1)``.

    Args:
      devices: how many devices, ``1 ≤ devices ≤ jax.device_count()``; ``None``: all of them.
      model: the size of the ``"model"`` axis; it must divide ``devices``.

    Returns:
      A ``jax.sharding.Mesh`` with ``AxisType.Auto`` axes.

    Raises:
      ValueError: ``devices`` or ``model`` is not a positive integer, ``model`` does not divide
        ``devices``, or there are fewer than ``devices`` devices (the message names how many
        there are and, on CPU, the ``XLA_FLAGS`` that splits the host into several).
    """
    available = jax.devices()
    devices = len(available) if devices is None else _positive_int(devices, "devices")
    model = _positive_int(model, "model")
    if devices > len(available):
        hint = ""
        if available[0].platform == "cpu":
            hint = (f" On CPU, split the host into {devices} devices by starting Python with "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} in the "
                    f"environment (before JAX is imported).")
        raise ValueError(f"make_mesh: devices={devices} but JAX sees {len(available)} "
                         f"{available[0].platform} device(s): {available}.{hint}")
    if devices % model:
        raise ValueError(f"make_mesh: model={model} must divide devices={devices} "
                         f"(the mesh is devices // model × model)")
    return jax.make_mesh((devices // model, model), (DATA, MODEL),
                         axis_types=(AxisType.Auto, AxisType.Auto), devices=available[:devices])


def data_sharding(mesh: Mesh) -> NamedSharding:
    """``NamedSharding(mesh, P("data"))``: the leading (batch) axis split over ``"data"``."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    """``NamedSharding(mesh, P())``: a full copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh) -> int:
    """Return the per-device batch ``batch_size // D`` for ``D`` devices along ``"data"``.

    Raises:
      ValueError: ``batch_size`` is not a multiple of ``D`` (each device must get the same
        number of examples).
    """
    n = mesh.shape[DATA]
    if batch_size % n:
        lower, upper = (batch_size // n) * n, (batch_size // n + 1) * n
        raise ValueError(
            f"batch_size={batch_size} does not split evenly over devices={n} (data axis of the "
            f"mesh): each device needs the same number of examples; use a multiple of {n}, "
            f"e.g. {lower or upper} or {upper}")
    return batch_size // n


def shard_batch(mesh: Mesh, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Place arrays with a leading batch axis ``(B, ...)`` on the mesh, split along it.

    Each device holds ``B/D`` rows (``D = mesh.shape["data"]``, replicated over ``"model"``).

    Raises:
      ValueError: an array's leading axis is not a multiple of ``D``.
    """
    for i, a in enumerate(arrays):
        if jnp.ndim(a) < 1:
            raise ValueError(f"shard_batch: array {i} is a scalar; it needs a leading batch axis")
        check_batch_size(jnp.shape(a)[0], mesh)
    return tuple(jax.device_put(a, data_sharding(mesh)) for a in arrays)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of ``tree`` (parameters, optimiser state) on every device of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def data_parallel_step(loss: Callable, opt: optax.GradientTransformation, mesh: Mesh) -> Callable:
    """``train.train_step`` jit-compiled for data parallelism over ``mesh``.

    Returns ``step(params, opt_state, xb, yb) -> (params, opt_state, loss)``: the mini-batch
    ``xb (B, ...)``, ``yb (B, ...)`` split along ``"data"`` (``B`` must be a multiple of the
    number of devices along it), parameters, optimiser state and outputs replicated. Arrays
    already placed (``shard_batch``, ``replicate``) are used where they are.
    """
    batch, rep = data_sharding(mesh), replicated(mesh)
    jitted = jax.jit(lambda p, s, xb, yb: train_step(loss, opt, p, s, xb, yb),
                     in_shardings=(rep, rep, batch, batch), out_shardings=rep)

    def step(params, opt_state, xb, yb):
        check_batch_size(jnp.shape(xb)[0], mesh)
        return jitted(params, opt_state, xb, yb)
    return step


def data_parallel_epoch(loss: Callable, opt: optax.GradientTransformation, mesh: Mesh,
                        batch_size: int, input_noise: float = 0.0) -> Callable:
    """``train.train_epoch`` (Algorithm 2) jit-compiled for data parallelism over ``mesh``.

    Returns ``epoch(state, x, y, key) -> (state, losses)``, the same function of its arguments
    as ``train_epoch`` (the same permutation, noise and steps, equal up to float round-off in
    the order of the batch sums). The training set ``x (n, ...)``, ``y (n, ...)``, the
    ``TrainState`` and the key are replicated; each mini-batch is constrained to
    ``P("data")``, so each device computes the loss and the hand-written backward of
    ``batch_size / D`` examples and XLA all-reduces the gradient.

    Raises:
      ValueError: ``batch_size`` is not a multiple of the devices along ``"data"``.
    """
    return model_parallel_epoch(loss, opt, mesh, batch_size, replicated(mesh), input_noise)


def state_shardings(state: Any, mesh: Mesh, param_shardings: Any) -> Any:
    """Shardings for a whole ``TrainState``: its parameters as ``param_shardings``, every
    sub-tree of the optimiser state shaped like the parameters (Adam's ``mu`` and ``nu``,
    momentum) the same way, everything else (step counts, the epoch) replicated."""
    structure = jax.tree.structure(state.params)
    rep = replicated(mesh)

    def place(node):
        if jax.tree.structure(node) == structure:
            return param_shardings
        return jax.tree.map(lambda _: rep, node)
    opt = jax.tree.map(place, state.opt_state,
                       is_leaf=lambda node: jax.tree.structure(node) == structure)
    return type(state)(param_shardings, opt, rep)


def model_parallel_epoch(loss: Callable, opt: optax.GradientTransformation, mesh: Mesh,
                         batch_size: int, shardings: Any, input_noise: float = 0.0) -> Callable:
    """``train.train_epoch`` on a 2-D mesh: each mini-batch split over ``"data"``, the
    parameters (and the optimiser state shaped like them) split over ``"model"`` as
    ``shardings`` says (e.g. ``state_shardings(state, mesh, mlp_shardings(params, mesh))``;
    ``replicated(mesh)`` is data parallelism, ``data_parallel_epoch``).

    Returns ``epoch(state, x, y, key) -> (state, losses)``, the same function of its arguments
    as ``train_epoch``; XLA inserts the all-reduces over ``"data"`` (the gradient) and over
    ``"model"`` (the row-split products), and the hand-written backwards run on each shard.

    Raises:
      ValueError: ``batch_size`` is not a multiple of the devices along ``"data"``.
    """
    check_batch_size(batch_size, mesh)
    rep = replicated(mesh)
    return jax.jit(lambda state, x, y, key: train_epoch(
        loss, opt, state, x, y, key, batch_size, input_noise, batch_sharding=data_sharding(mesh)),
        in_shardings=(shardings, rep, rep, rep), out_shardings=(shardings, rep))


def gather(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of ``tree`` whole (replicated) on every device of ``mesh``, by a jit-compiled
    identity with replicated outputs (works across processes, unlike ``device_put``)."""
    return jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)


def mlp_specs(params: list[dict]) -> list[dict[str, P]]:
    """Megatron-style ``PartitionSpec`` for each ``jb.mlp`` layer ``{"W": (n, m), "b": (n,)}``.

    Layers go in pairs: layer ``2i`` is split along its output dimension (``W: P("model",
    None)``, ``b: P("model")``), layer ``2i + 1`` along its input dimension (``W: P(None,
    "model")``, ``b: P()``, added once after the all-reduce). A last unpaired layer (the
    output layer of an MLP with an odd number of layers) is replicated.
    """
    specs = []
    for i, layer in enumerate(params):
        if i % 2 == 0 and i + 1 < len(params):
            spec = {"W": P(MODEL, None), "b": P(MODEL)}
        elif i % 2 == 1:
            spec = {"W": P(None, MODEL), "b": P()}
        else:
            spec = {"W": P(), "b": P()}
        specs.append({k: spec[k] for k in layer})
    return specs


def mlp_shardings(params: list[dict], mesh: Mesh) -> list[dict[str, NamedSharding]]:
    """``NamedSharding(mesh, mlp_specs(params))``, checked against the shapes.

    Raises:
      ValueError: a split dimension (the hidden widths of the paired layers) is not a
        multiple of ``mesh.shape["model"]``.
    """
    m = mesh.shape[MODEL]
    specs = mlp_specs(params)
    for i, (layer, spec) in enumerate(zip(params, specs)):
        shape = jnp.shape(layer["W"])
        for axis, name in enumerate(spec["W"]):
            if name == MODEL and shape[axis] % m:
                raise ValueError(
                    f"mlp_shardings: layer {i} W has shape {shape}; its axis {axis} (size "
                    f"{shape[axis]}) is split over model={m} devices and must be a multiple of {m}")
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda s: isinstance(s, P))


def shard_mlp(params: list[dict], mesh: Mesh) -> list[dict]:
    """Place ``jb.mlp`` parameters on ``mesh`` as ``mlp_specs`` says (``jax.device_put``).

    Inside a jitted function, ``jax.lax.with_sharding_constraint(params, mlp_shardings(params,
    mesh))`` is the same annotation.
    """
    return jax.device_put(params, mlp_shardings(params, mesh))


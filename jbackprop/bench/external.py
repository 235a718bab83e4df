"""Optional columns of ``jbackprop bench``: the same models in PyTorch (eager and
``torch.compile``), Equinox and Flax, when those libraries are installed. None is a dependency.

Each builder returns ``{column: step}`` where ``step()`` runs one whole training step (forward,
cross-entropy, backward, Adam update) on the benchmark's batch and waits for it. PyTorch runs
on the CPU with as many threads as cores; its models are the configurations' mathematics
(``nn.Linear`` is ``W z + b``; ``nn.LayerNorm`` over the features, ε = 1e-5; ``nn.Conv2d`` /
``nn.Conv1d`` with ``padding="same"``).

Which library builds which configuration kind (``COLUMNS``):

* PyTorch: every kind;
* Equinox: the MLPs, the classifier and the convolutional nets (``eqx.nn.Conv`` is
  ``lax.conv_general_dilated`` on one example, channels first, vmapped over the batch);
* Flax (``flax.linen``): the convolutional nets (``nn.Conv``, ``NHWC`` on the batch, as Flax
  users write them).

A library that is not installed gives no column and is never imported: ``available()`` asks
``importlib.util.find_spec`` only, and ``skipped(spec)`` says, per library, why it has no
column for a configuration (the harness records it, the report prints it). The test extra
installs Equinox, so CI runs its columns (``tests/test_bench_external.py``); PyTorch is too
large to install there and Flax pulls in Orbax and TensorStore, so in CI those columns are
skipped this way, and their tests run only where the library is installed.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Callable

import numpy as np


LIBRARIES = ("torch", "equinox", "flax")

# The configuration kinds (``Problem.spec["kind"]``) each library has a model for.
COLUMNS = {"torch": ("mlp", "classifier", "ln", "resnet", "conv"),
           "equinox": ("mlp", "classifier", "conv"),
           "flax": ("conv",)}


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):      # a module set to None in sys.modules (tests), …
        return False


def available() -> dict[str, str | None]:
    """Versions of the optional libraries that are installed (``None`` if not)."""
    out = {}
    for name in LIBRARIES:
        if not _installed(name):
            out[name] = None
        else:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
    return out


def skipped(spec: dict) -> dict[str, str]:
    """``{library: why it has no column}`` for ``spec``'s configuration: not installed, or no
    model of that kind written for it."""
    have, out = available(), {}
    for name in LIBRARIES:
        if have[name] is None:
            out[name] = "not installed"
        elif spec["kind"] not in COLUMNS[name]:
            out[name] = f"no {name} model for a {spec['kind']!r} configuration"
    return out


def steps(spec: dict, x, y) -> dict[str, Callable[[], Any]]:
    """Step functions for the installed libraries that can build ``spec``'s model."""
    ok = set(LIBRARIES) - set(skipped(spec))
    out: dict[str, Callable[[], Any]] = {}
    if "torch" in ok:
        out.update(_torch_steps(spec, np.asarray(x), np.asarray(y)))
    if "equinox" in ok:
        out["equinox"] = _equinox_step(spec, x, y)
    if "flax" in ok:
        out["flax"] = _flax_step(spec, x, y)
    return out


# --- PyTorch ---------------------------------------------------------------------------------
def _torch_model(spec: dict):
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            return z + self.inner(z)

    class ChannelLayerNorm(nn.Module):      # LN over the channels at every position (NC…)
        def __init__(self, c):
            super().__init__()
            self.ln = nn.LayerNorm(c)

        def forward(self, z):
            return self.ln(z.movedim(1, -1)).movedim(-1, 1)

    kind = spec["kind"]
    if kind == "conv":
        Conv = {"1d": nn.Conv1d, "2d": nn.Conv2d}[spec["conv"]]
        shape, c = spec["shape"], spec["channels"]
        head = [nn.Flatten(), nn.Linear(c * math.prod(shape[:-1]), spec["classes"])]
        if spec["layers"] == "pair":
            return nn.Sequential(Conv(shape[-1], c, 3, padding="same"), nn.ReLU(),
                                 Conv(c, c, 3, padding="same"), *head)
        return nn.Sequential(Conv(shape[-1], c, 3, padding="same"), ChannelLayerNorm(c),
                             nn.ReLU(), Residual(nn.Sequential(Conv(c, c, 3, padding="same"),
                                                               nn.ReLU())), *head)
    if kind == "mlp":
        s = spec["sizes"]
        layers = []
        for m, n in zip(s[:-2], s[1:-1]):
            layers += [nn.Linear(m, n), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(s[-2], s[-1]))
    if kind == "classifier":
        return nn.Linear(spec["in"], spec["classes"])
    if kind == "ln":
        w = spec["width"]
        blocks = [Residual(nn.Sequential(nn.Linear(w, w), nn.LayerNorm(w), nn.ReLU()))
                  for _ in range(spec["blocks"])]
        return nn.Sequential(*blocks, nn.Linear(w, spec["classes"]))
    if kind == "resnet":
        w = spec["width"]
        blocks = [Residual(nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU()))
                  for _ in range(spec["depth"])]
        return nn.Sequential(nn.Linear(spec["in"], w), *blocks, nn.Linear(w, spec["classes"]))
    raise ValueError(f"no PyTorch model for configuration kind {kind!r}")


def _torch_steps(spec: dict, x: np.ndarray, y: np.ndarray) -> dict[str, Callable[[], Any]]:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    if spec["kind"] == "conv":       # PyTorch's convolutions take channels first: (B, C, …)
        x = np.moveaxis(x, -1, 1)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    out = {}
    for name, compiled in (("torch eager", False), ("torch.compile", True)):
        torch.manual_seed(0)
        model = _torch_model(spec)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        forward = torch.compile(model) if compiled else model

        def step(forward=forward, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(forward(xt), yt).backward()
            opt.step()

        step(), step()                       # torch.compile compiles on the first calls
        out[name] = step
    return out


# --- Equinox ---------------------------------------------------------------------------------
def equinox_model(spec: dict):
    """The Equinox model of an ``"mlp"`` (ReLU, last layer linear), ``"classifier"`` or
    ``"conv"`` spec: ``eqx.nn.MLP``, ``eqx.nn.Linear`` (whose layers hold ``weight (n, m)`` and
    ``bias (n,)`` as ``jb.mm``'s ``W`` and ``b``) or ``EquinoxConvNet``."""
    import equinox as eqx
    import jax

    key = jax.random.PRNGKey(0)
    if spec["kind"] == "mlp":
        s = spec["sizes"]
        return eqx.nn.MLP(s[0], s[-1], s[1], len(s) - 2, activation=jax.nn.relu, key=key)
    if spec["kind"] == "classifier":
        return eqx.nn.Linear(spec["in"], spec["classes"], key=key)
    if spec["kind"] == "conv":
        return _equinox_conv_net(spec, key)
    raise ValueError(f"no Equinox model for configuration kind {spec['kind']!r}")


def _equinox_conv_net(spec: dict, key):
    """A ``"conv"`` spec's net as an Equinox user writes it, on one example **channels first**
    ``(C, *S)`` (Equinox's convention): ``eqx.nn.Conv`` with ``padding="SAME"``, LN over the
    channels at each position (``eqx.nn.LayerNorm`` vmapped over the positions), ReLU, the
    flattened ``(C', *S)`` into ``eqx.nn.Linear``. ``"pair"``: Conv → ReLU → Conv → Linear;
    ``"net"``: Conv → LN → ReLU → (z + ReLU(Conv z)) → Linear (``jb.conv_net``)."""
    import equinox as eqx
    import jax

    class EquinoxConvNet(eqx.Module):
        conv1: eqx.nn.Conv
        conv2: eqx.nn.Conv
        head: eqx.nn.Linear
        ln: eqx.nn.LayerNorm | None

        def __call__(self, x):
            z = self.conv1(x)
            if self.ln is None:                                        # "pair"
                z = self.conv2(jax.nn.relu(z))
            else:                                                      # "net"
                flat = z.reshape(z.shape[0], -1)                       # (C', positions)
                z = jax.nn.relu(jax.vmap(self.ln, 1, 1)(flat).reshape(z.shape))
                z = z + jax.nn.relu(self.conv2(z))
            return self.head(z.reshape(-1))

    shape, c = spec["shape"], spec["channels"]
    n = len(shape) - 1
    k1, k2, k3 = jax.random.split(key, 3)
    return EquinoxConvNet(
        conv1=eqx.nn.Conv(n, shape[-1], c, 3, padding="SAME", key=k1),
        conv2=eqx.nn.Conv(n, c, c, 3, padding="SAME", key=k2),
        head=eqx.nn.Linear(c * math.prod(shape[:-1]), spec["classes"], key=k3),
        ln=eqx.nn.LayerNorm(c) if spec["layers"] == "net" else None)


def equinox_input(spec: dict, x):
    """The batch as Equinox's model takes it: channels first per example for ``"conv"``
    (``(B, *S, C)`` → ``(B, C, *S)``), unchanged otherwise."""
    import jax.numpy as jnp

    return jnp.moveaxis(jnp.asarray(x), -1, 1) if spec["kind"] == "conv" else jnp.asarray(x)


def equinox_loss(model, x, y):
    """Mean cross-entropy of ``model`` vmapped over the batch ``x`` with integer labels ``y``."""
    import jax
    import jax.numpy as jnp

    logits = jax.vmap(model)(x)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])


def _equinox_step(spec: dict, x, y) -> Callable[[], Any]:
    import equinox as eqx
    import jax
    import optax

    x = equinox_input(spec, x)                  # the layout change is not part of the step
    model = jax.tree.map(lambda a: a.astype(x.dtype) if eqx.is_inexact_array(a) else a,
                         equinox_model(spec))   # the batch's dtype (float64 weights under x64)
    opt = optax.adam(1e-3)
    opt_state = opt.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        value, grads = eqx.filter_value_and_grad(equinox_loss)(model, x, y)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, value

    step(model, opt_state, x, y)
    return lambda: step(model, opt_state, x, y)


# --- Flax ------------------------------------------------------------------------------------
def flax_model(spec: dict):
    """The Flax (``flax.linen``) model of a ``"conv"`` spec, as Flax users write it, on the
    **batch** ``(B, *S, C)`` (``NHWC``, Flax's convention): ``nn.Conv(c, (3, 3),
    padding="SAME")`` (kernel ``(3, 3, C, c)``, jbackprop's layout), ``nn.LayerNorm(epsilon=
    1e-5)`` over the channels, ``nn.relu``, ``nn.Dense`` on the flattened features (kernel
    ``Wᵀ``). ``"pair"`` and ``"net"`` as ``_equinox_conv_net``."""
    import flax.linen as nn

    if spec["kind"] != "conv":
        raise ValueError(f"no Flax model for configuration kind {spec['kind']!r}")
    c, n, layers = spec["channels"], len(spec["shape"]) - 1, spec["layers"]

    class FlaxConvNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            conv = lambda name: nn.Conv(c, (3,) * n, padding="SAME", name=name)
            z = conv("conv1")(x)
            if layers == "pair":
                z = conv("conv2")(nn.relu(z))
            else:
                z = nn.relu(nn.LayerNorm(epsilon=1e-5, name="ln")(z))
                z = z + nn.relu(conv("conv2")(z))
            return nn.Dense(spec["classes"], name="head")(z.reshape(z.shape[0], -1))

    return FlaxConvNet()


def flax_loss(model, variables, x, y):
    """Mean cross-entropy (optax's, as in Flax's examples) of ``model`` on the batch."""
    import jax.numpy as jnp
    import optax

    logits = model.apply(variables, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _flax_step(spec: dict, x, y) -> Callable[[], Any]:
    import jax
    import jax.numpy as jnp
    import optax

    model = flax_model(spec)
    x = jnp.asarray(x)
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    opt = optax.adam(1e-3)
    opt_state = opt.init(variables)

    @jax.jit
    def step(variables, opt_state, x, y):
        value, grads = jax.value_and_grad(flax_loss, 1)(model, variables, x, y)
        updates, opt_state = opt.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, value

    step(variables, opt_state, x, y)
    return lambda: step(variables, opt_state, x, y)

"""Optional columns of ``jbackprop bench``: the same models in PyTorch (eager and
``torch.compile``) and in Equinox, when those libraries are installed. Neither is a dependency.

Each builder returns ``{column: step}`` where ``step()`` runs one whole training step (forward,
cross-entropy, backward, Adam update) on the benchmark's batch and waits for it. PyTorch runs
on the CPU with as many threads as cores; its models are the configurations' mathematics
(``nn.Linear`` is ``W z + b``; ``nn.LayerNorm`` over the features, ε = 1e-5). Convolutional
configurations have no external column.

A library that is not installed gives no column and is never imported: ``available()`` asks
``importlib.util.find_spec`` only. The test extra installs Equinox, so CI runs its column
(``tests/test_bench_external.py``); PyTorch is too large to install there, so in CI the torch
columns are skipped this way, and their tests run only where torch is installed.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable

import numpy as np


def available() -> dict[str, str | None]:
    """Versions of the optional libraries that are installed (``None`` if not)."""
    out = {}
    for name in ("torch", "equinox"):
        if importlib.util.find_spec(name) is None:
            out[name] = None
        else:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
    return out


def steps(spec: dict, x, y) -> dict[str, Callable[[], Any]]:
    """Step functions for the installed libraries that can build ``spec``'s model."""
    have = available()
    out: dict[str, Callable[[], Any]] = {}
    if have["torch"] and spec["kind"] != "conv":
        out.update(_torch_steps(spec, np.asarray(x), np.asarray(y)))
    if have["equinox"] and spec["kind"] in ("mlp", "classifier"):
        out["equinox"] = _equinox_step(spec, x, y)
    return out


# --- PyTorch ---------------------------------------------------------------------------------
def _torch_model(spec: dict):
    import torch
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            return z + self.inner(z)

    kind = spec["kind"]
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
    xt, yt = torch.from_numpy(np.array(x, np.float32)), torch.from_numpy(y.astype(np.int64))
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
    """The Equinox model of an ``"mlp"`` (ReLU, last layer linear) or ``"classifier"`` spec:
    ``eqx.nn.MLP`` or ``eqx.nn.Linear``, whose layers hold ``weight (n, m)`` and ``bias (n,)``
    as ``jb.mm``'s ``W`` and ``b``."""
    import equinox as eqx
    import jax

    key = jax.random.PRNGKey(0)
    if spec["kind"] == "mlp":
        s = spec["sizes"]
        return eqx.nn.MLP(s[0], s[-1], s[1], len(s) - 2, activation=jax.nn.relu, key=key)
    if spec["kind"] == "classifier":
        return eqx.nn.Linear(spec["in"], spec["classes"], key=key)
    raise ValueError(f"no Equinox model for configuration kind {spec['kind']!r}")


def equinox_loss(model, x, y):
    """Mean cross-entropy of ``model`` vmapped over the batch ``x`` with integer labels ``y``."""
    import jax
    import jax.numpy as jnp

    logits = jax.vmap(model)(x)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])


def _equinox_step(spec: dict, x, y) -> Callable[[], Any]:
    import equinox as eqx
    import optax

    model = equinox_model(spec)
    opt = optax.adam(1e-3)
    opt_state = opt.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        value, grads = eqx.filter_value_and_grad(equinox_loss)(model, x, y)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, value

    step(model, opt_state, x, y)
    return lambda: step(model, opt_state, x, y)

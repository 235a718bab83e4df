"""Where a NaN or Inf first appears: ``locate_nonfinite`` runs a function's forward and backward
eagerly (``jax.disable_jit()``) with the rules of every declared module wrapped, so that each
backward call records its step in the chain and which cotangents are finite (values still traced,
inside ``jax.vmap``, by ``jax.debug.callback``). The very same ``fwd`` and ``bwd`` objects are
put back afterwards, also when the function raises; nested calls each record their own calls.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jbackprop._compat import Tracer, custom_vjp_rules, set_custom_vjp_rules

__all__ = ["locate_nonfinite", "NonFiniteReport", "BackwardCall", "ForwardCall"]


@dataclasses.dataclass
class BackwardCall:
    """One run of a module's hand-written backward: its ``step`` in the chain (1 runs first,
    nearest the output), the ``module`` (``conv1d/conv2d``: a core two modules share), the module
    whose backward ran it (``inside``: ``residual`` for its MMs), whether its incoming cotangent
    was finite, and for each array leaf it returns (``params['W']``, ``z``) whether it is."""
    step: int
    module: str
    inside: str | None
    incoming_finite: bool
    leaves: dict[str, bool] = dataclasses.field(default_factory=dict)

    @property
    def produced(self) -> bool:            # a finite cotangent in, a non-finite one out
        return self.incoming_finite and not all(self.leaves.values())


@dataclasses.dataclass
class ForwardCall:
    """One run of a module's forward rule (``step`` 1 finished first)."""
    step: int
    module: str
    inputs_finite: bool
    output_finite: bool


@dataclasses.dataclass(frozen=True)
class NonFiniteReport:
    """What ``locate_nonfinite`` found; ``str()`` says it in one sentence.

    Attributes:
      kind: ``"finite"``; ``"backward"`` (the backward of ``module`` turned a finite cotangent
        into non-finite ``leaves`` at ``step`` of ``steps``); ``"forward"`` (the output is
        non-finite; ``module``, if any, is the first forward to make it so from finite
        inputs); ``"outside"`` (in code between modules); ``"input"`` (``leaves``: the
        non-finite arguments); ``"cotangent"`` (the given ``v`` is not finite).
      calls, forward_calls: every backward and forward call recorded, in order.
    """
    kind: str
    module: str | None = None
    leaves: tuple[str, ...] = ()
    step: int | None = None
    steps: int = 0
    inside: str | None = None
    calls: tuple[BackwardCall, ...] = ()
    forward_calls: tuple[ForwardCall, ...] = ()

    finite = property(lambda self: self.kind == "finite")

    def __str__(self) -> str:
        leaf = ("leaves " if len(self.leaves) > 1 else "leaf ") + ", ".join(
            f"`{n}`" for n in self.leaves)
        first = next((c for c in self.calls if not c.incoming_finite), None)
        outside = ("it arose outside any jbackprop module (in code between modules" +
                   (f"; the first backward to receive it was `{first.module}` at step "
                    f"{first.step} of {self.steps})" if first and self.kind == "outside" else ")"))
        if self.kind == "backward":
            where = f" (inside the backward of `{self.inside}`)" if self.inside else ""
            return (f"non-finite cotangent first produced by the backward of `{self.module}`"
                    f"{where} for {leaf} at step {self.step} of {self.steps} of the backward "
                    "chain (its incoming cotangent was finite)")
        if self.kind == "forward":
            return "the forward output is non-finite, " + (
                f"first produced by the forward of `{self.module}` at step {self.step} of "
                f"{self.steps} of the forward pass (its inputs were finite)" if self.module else
                f"but no jbackprop module's forward made it so from finite inputs: {outside}")
        return {"finite": f"all cotangents are finite: the output, the {self.steps} backward "
                          "calls of jbackprop modules and the gradient",
                "input": f"the arguments are not finite ({leaf}); give finite inputs",
                "cotangent": "the cotangent v given is not finite",
                "outside": "a cotangent is non-finite, but no jbackprop module's backward made "
                           f"it so from a finite one: {outside}"}[self.kind]


class _Session:
    """One call's records, by wrapper run (``token``): a ``vmap``-ed rule's callbacks merge."""

    def __init__(self):    # ``finished``: in completion order (an inner call before its outer)
        self.calls, self.forward, self.open, self.stack, self.finished = [], [], {}, [], []

    def begin(self, token, module, finite):
        if token not in self.open:
            inside = self.stack[-1].module if self.stack else None
            self.open[token] = BackwardCall(len(self.calls) + 1, module, inside, True)
            self.calls.append(self.open[token])
            self.stack.append(self.open[token])
        self.open[token].incoming_finite &= bool(finite)

    def end(self, token, names, *finite):
        rec = self.open[token]
        if self.stack and self.stack[-1] is rec:
            self.stack.pop()
            self.finished.append(rec)
        for n, f in zip(names, finite):
            rec.leaves[n] = rec.leaves.get(n, True) and bool(f)

    def forward_done(self, token, module, inputs, output):
        if token not in self.open:
            self.open[token] = ForwardCall(len(self.forward) + 1, module, True, True)
            self.forward.append(self.open[token])
        self.open[token].inputs_finite &= bool(inputs)
        self.open[token].output_finite &= bool(output)


_SESSIONS: list[_Session] = []
_INSTALLED: dict[Any, list] = {}            # core -> [original fwd, original bwd, users]


def _finite(tree):
    """``all(isfinite)`` over the floating leaves of ``tree`` (``True`` if there are none)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
             if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else True


def _emit(method: str, *static, flags):
    """The current session's ``method(*static, *flags)``: now, or once traced flags have their
    values (``jax.debug.callback``)."""
    def record(*values):
        return getattr(_SESSIONS[-1], method)(*static, *values) if _SESSIONS else None
    if any(isinstance(f, Tracer) for f in flags):
        jax.debug.callback(record, *flags)
    else:
        record(*flags)


def _wrap(core, module: str):
    if hasattr(core, "array_names"):                 # a custom_rules core (every module's)
        fwd, bwd, diff = core.fwd, core.bwd, core.array_names
    else:                                            # a user's jax.custom_vjp
        fwd, bwd, nondiff, names = custom_vjp_rules(core)
        diff = [n for i, n in enumerate(names) if i not in nondiff]

    def watched_fwd(*args, **kwargs):
        out, residuals = fwd(*args, **kwargs)
        _emit("forward_done", object(), module, flags=[_finite((args, kwargs)), _finite(out)])
        return out, residuals

    def watched_bwd(*args):
        token = object()
        _emit("begin", token, module, flags=[_finite(args[-1])])
        cts = bwd(*args)
        pairs = [(name + jax.tree_util.keystr(path), x) for name, ct in zip(diff, cts)
                 for path, x in jax.tree_util.tree_flatten_with_path(ct)[0]]
        _emit("end", token, [n for n, _ in pairs], flags=[_finite(x) for _, x in pairs])
        return cts
    return fwd, bwd, watched_fwd, watched_bwd


def _library_cores() -> dict:
    """``{core: name}`` of every declared module with a core."""
    from jbackprop.modules.registry import declarations
    cores = [d.fn.core for d in declarations() if getattr(d.fn, "core", None) is not None]
    return {c: "/".join(d.name for d in declarations() if getattr(d.fn, "core", None) is c)
            for c in cores}


@contextlib.contextmanager
def _watching(cores: Mapping[Any, str]):
    """Wrap the rules of ``cores`` (``{core: name}``); restore the originals on the way out."""
    entered = []
    try:
        for core, name in cores.items():
            if core not in _INSTALLED:             # the outermost call wraps, the last restores
                *originals, w_fwd, w_bwd = _wrap(core, name)
                _INSTALLED[core] = [*originals, 0]
                set_custom_vjp_rules(core, w_fwd, w_bwd)
            _INSTALLED[core][2] += 1
            entered.append(core)
        yield
    finally:
        for core in entered:
            _INSTALLED[core][2] -= 1
            if not _INSTALLED[core][2]:
                fwd, bwd, _ = _INSTALLED.pop(core)
                set_custom_vjp_rules(core, fwd, bwd)


def locate_nonfinite(fn: Callable, *args: Any, v: Any = None,
                     argnums: int | Sequence[int] | None = None,
                     cores: Mapping[str, Callable] | None = None) -> NonFiniteReport:
    """Name the first module whose backward turns finite cotangents into NaN or Inf.

    Args:
      fn: the function, built from jbackprop modules (``jax.jit`` inside it is disabled).
      *args: its arguments, concrete and finite.
      v: the cotangent of the output (default: ones like the output).
      argnums: the arguments to differentiate (default: those whose leaves are all floating).
      cores: more ``jax.custom_vjp`` functions to watch, by name (``{"my_op": _my_op}``).

    Returns:
      A ``NonFiniteReport``; its ``calls`` hold every backward call recorded, in order.

    Raises:
      TypeError: an argument is traced (call it outside ``jax.jit``).
    """
    if any(isinstance(x, Tracer) for x in jax.tree.leaves(args)):
        raise TypeError("locate_nonfinite runs eagerly: call it outside jax.jit / jax.vmap")
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args) if jax.tree.leaves(a) and all(
            jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in jax.tree.leaves(a)))
    argnums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    bad = tuple(f"args[{i}]" + jax.tree_util.keystr(p) for i, a in enumerate(args)
                for p, x in jax.tree_util.tree_flatten_with_path(a)[0] if not bool(_finite(x)))
    if bad or (v is not None and not bool(_finite(v))):
        return NonFiniteReport("input", leaves=bad) if bad else NonFiniteReport("cotangent")

    diff_fn = lambda *diff: fn(*[dict(zip(argnums, diff)).get(i, a) for i, a in enumerate(args)])
    watched = {**_library_cores(), **{c: n for n, c in (cores or {}).items()}}
    session = _Session()
    with _watching(watched), jax.disable_jit():
        _SESSIONS.append(session)
        try:
            out, pullback = jax.vjp(diff_fn, *[args[i] for i in argnums])
            grads = pullback(jax.tree.map(jnp.ones_like, out) if v is None else v)
            jax.effects_barrier()
        finally:
            _SESSIONS.remove(session)
    calls, forward = tuple(session.calls), tuple(session.forward)
    common = {"calls": calls, "forward_calls": forward}
    if not bool(_finite(out)):
        first = next((f for f in forward if f.inputs_finite and not f.output_finite), None)
        return NonFiniteReport("forward", first and first.module, step=first and first.step,
                               steps=len(forward), **common)
    culprit = next((c for c in session.finished if c.produced), None)
    if culprit is not None:
        return NonFiniteReport("backward", culprit.module,
                               tuple(n for n, ok in culprit.leaves.items() if not ok),
                               culprit.step, len(calls), culprit.inside, **common)
    finite = bool(_finite(grads)) and all(c.incoming_finite for c in calls)
    return NonFiniteReport("finite" if finite else "outside", steps=len(calls), **common)

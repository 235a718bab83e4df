"""The module registry: every module is declared once, and everything else derives from it.

A ``declare(fn, ...)`` call sits under each public module, in its family's file. It records what
the machinery needs — the pure-``jnp`` reference, example arguments at two or more shapes, the
hyper-parameter grid, the derivation section, the known kinks, whether leading batch axes are
accepted, the stax-like layer — and gives the module its notes-form ``fn.vjp`` / ``fn.backward``.

From the registry come:

* ``cases()``: what ``jbackprop check`` verifies and what the test-suite parametrises over
  (``verify_vjp`` of every module at every example and hyper-parameter setting);
* ``jbackprop.modules.combinators``: a layer for every module that declares one;
* ``reference_of(fn)``: the reference that ``--backward autodiff`` and the benchmarks train with;
* ``markdown_table()``: the API table of the documentation site (``docs/hooks.py``).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import zlib
from typing import Callable, NamedTuple, Sequence

import numpy as np

from jbackprop.modules import wiring

FAMILIES = ("linear", "activations", "normalisation", "convolution", "pooling", "losses",
            "attention", "regularisation", "models", "transformer")
# A family's modules live in the file of its name, and in these further files.
MORE_FILES = {"losses": ("fused_loss",)}


@dataclasses.dataclass(frozen=True)
class Declaration:
    """One module, declared once (see ``declare`` for the fields)."""
    fn: Callable
    reference: Callable
    examples: Callable[[np.random.Generator], Sequence[tuple]]
    family: str
    section: str
    shapes: str
    backward: str
    tangent: str = ""
    hyper: tuple[dict, ...] = ({},)
    nondiff: tuple[int, ...] = ()
    cores: tuple[Callable, ...] = ()
    kinks: str = ""
    batch_axes: bool = True
    layer: str | None = None
    init: Callable | None = None

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def page(self) -> str:
        """The derivation section, relative to ``docs/``: ``normalisation.md#rmsnorm``."""
        return f"{self.family}.md#{self.section}"


_REGISTRY: dict[str, Declaration] = {}


def declare(fn: Callable, *, reference: Callable, examples: Callable, family: str, section: str,
            shapes: str, backward: str, tangent: str, core: Callable | None = None,
            num_arrays: int = 1,
            hyper: Sequence[dict] = ({},), nondiff: Sequence[int] = (),
            uses: Sequence[Callable] = (), kinks: str = "", batch_axes: bool = True,
            layer: str | None = None, init: Callable | None = None) -> Declaration:
    """Declare the public module ``fn`` (in its family's file, under its definition).

    Args:
      fn: the public function; its first ``num_arrays`` parameters are arrays (pytrees), the
        rest hyper-parameters.
      reference: the same mathematics in plain ``jnp``, with the same signature
        (``jbackprop.reference``); ``jax.grad`` of it is the independent evidence.
      examples: ``rng -> [args, ...]``: float64 NumPy arguments at two or more shapes, away from
        kinks; integer leaves are labels.
      family, section: the derivation page ``docs/{family}.md`` and the heading's anchor there.
      shapes, backward, tangent: the API table's "parameters / shapes", "backward" and "JVP"
        cells.
      core: the ``custom_rules`` core that ``fn`` applies; gives ``fn.linearize``, ``fn.vjp``,
        ``fn.backward`` and ``fn.tangent`` (a model composed of modules has none).
      num_arrays: how many leading arguments are arrays.
      hyper: the hyper-parameter settings to verify (keyword dicts; ``{}`` is the defaults).
      nondiff: argument positions never differentiated (labels, even when float).
      uses: the cores whose rules ``jax.grad`` and ``jax.jvp`` must run (default: ``core``).
      kinks: where the derivative jumps and which value the rule takes there.
      batch_axes: whether extra leading axes of the data are a batch (the tests compare them
        with ``jax.vmap``).
      layer: the name of the module's stax-like layer in ``combinators`` (``None``: no layer;
        losses take labels and models are built from layers).
      init: ``(key, in_shape, dtype) -> params`` for a layer generated from the registry.
    """
    if core is not None:
        wiring.attach(fn, core, num_arrays)
    decl = Declaration(fn, reference, examples, family, section, shapes, backward, tangent,
                       tuple(hyper),
                       tuple(nondiff), tuple(uses) or ((core,) if core is not None else ()),
                       kinks, batch_axes, layer, init)
    _REGISTRY[decl.name] = decl
    return decl


def declarations() -> list[Declaration]:
    """Every declared module, family by family in the order of their files."""
    for family in FAMILIES:
        for name in (family, *MORE_FILES.get(family, ())):
            importlib.import_module(f"jbackprop.modules.{name}")
    return sorted(_REGISTRY.values(), key=lambda d: FAMILIES.index(d.family))  # stable


def of(fn: Callable) -> Declaration:
    """The declaration of a module (or of a ``functools.partial`` of one)."""
    fn = fn.func if isinstance(fn, functools.partial) else fn
    declarations()
    decl = _REGISTRY.get(getattr(fn, "__name__", None))
    if decl is None or decl.fn is not fn:
        raise TypeError(f"{fn!r} is not a declared jbackprop module")
    return decl


def reference_of(fn: Callable) -> Callable:
    """The pure-``jnp`` reference of a module, keeping a ``functools.partial``'s keywords."""
    ref = of(fn).reference
    return functools.partial(ref, **fn.keywords) if isinstance(fn, functools.partial) else ref


class Case(NamedTuple):
    """One verification case: ``verify_vjp(fn, *args, reference=reference, **options)``."""
    name: str
    fn: Callable
    reference: Callable
    args: tuple
    options: dict
    declaration: Declaration


def _label(args: tuple) -> str:
    """``[7x5]``: the shape of the first argument that is not a parameter container."""
    data = next((a for a in args if not isinstance(a, (dict, list, tuple))), args[-1])
    return "[" + "x".join(map(str, np.shape(data))) + "]"


def _hyper_label(hyper: dict) -> str:
    return "(" + ", ".join(f"{k}={getattr(v, '__name__', v)}" for k, v in hyper.items()) + ")" \
        if hyper else ""


def cases(seed: int = 0) -> list[Case]:
    """Every declared module at every example shape and hyper-parameter setting."""
    out = []
    for decl in declarations():
        rng = np.random.default_rng([seed, zlib.crc32(decl.name.encode())])   # per module
        for args in decl.examples(rng):
            for hyper in decl.hyper:
                options = {"argnums": tuple(i for i in range(len(args)) if i not in decl.nondiff
                                            and _all_float(args[i]))}
                out.append(Case(decl.name + _hyper_label(hyper) + _label(args),
                                functools.partial(decl.fn, **hyper),
                                functools.partial(decl.reference, **hyper), args, options, decl))
    return out


def _all_float(tree) -> bool:
    leaves = [np.asarray(x) for x in _leaves(tree)]
    return bool(leaves) and all(np.issubdtype(x.dtype, np.floating) for x in leaves)


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _leaves(v)]
    return [tree]


def markdown_table() -> str:
    """The API table (one row per module) for the documentation, from the declarations."""
    rows = ["| call | parameters / shapes | backward (hand-written) | JVP (hand-written) | kinks "
            "| derivation |", "| --- | --- | --- | --- | --- | --- |"]
    for d in declarations():
        hyper = ", ".join(f"{k}" for h in d.hyper for k in h)
        call = f"`jb.{d.name}`" + (f" (verified with {hyper} set)" if hyper else "")
        rows.append(f"| {call} | {d.shapes} | {d.backward} | {d.tangent} | {d.kinks or '—'} | "
                    f"[{d.family} § {d.section}](../{d.page}) |")
    return "\n".join(rows)


def normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    """Float64 standard normal numbers, for ``examples``."""
    return scale * rng.standard_normal(shape)


def away_from(rng: np.random.Generator, shape, kink: float = 0.0, margin: float = 0.05):
    """Normal numbers at least ``margin`` from ``kink`` (examples of kinked activations)."""
    x = rng.standard_normal(shape)
    return np.where(np.abs(x - kink) < margin, kink + np.copysign(margin, x - kink), x)

"""The structured report of ``jbackprop.check.verify_vjp``: per-leaf rows, whole-function
checks, a readable table and JSON."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
from typing import Any, Sequence


@dataclasses.dataclass
class Comparison:
    """Hand-written cotangent of one leaf against independent evidence.

    ``error`` is the largest per-element error ``|actual_i − expected_i| / (|expected_i| +
    scale_i)`` (``jbackprop.check.arrays.compare``: ``scale_i`` is the element's local scale,
    never the leaf's largest element); ``worst_index`` is that element, with both values there.
    """
    error: float
    max_abs: float
    worst_index: tuple[int, ...]
    actual: float
    expected: float
    tol: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.error <= self.tol)


@dataclasses.dataclass
class Taylor:
    """Taylor remainder test of one leaf: ``r1(h) = |J(x+hδ) − J(x)|`` should shrink at rate 1,
    ``r2(h) = |J(x+hδ) − J(x) − h⟨∇J, δ⟩|`` at rate 2. ``exact``: every ``r2`` sat at the
    round-off floor (``J`` is linear along ``δ``). ``converged``: the smallest steps' ``r2`` reach
    the floor — after the steps that crossed a kink (ReLU), a piecewise-linear ``J`` is exact
    again. Both pass: a wrong gradient leaves ``r2 ≈ h |⟨∇J − g, δ⟩|`` above the floor."""
    h: list[float]
    r1: list[float]
    r2: list[float]
    rate1: float
    rate2: float
    exact: bool
    converged: bool = False
    min_rate2: float = 1.8

    @property
    def passed(self) -> bool:
        return bool(self.exact or self.converged or self.rate2 >= self.min_rate2)


@dataclasses.dataclass
class Check:
    """A whole-function check (contract, primal, adjoint, linearity, jit, vmap, …); ``key`` is its
    name in ``ALL_CHECKS``."""
    name: str
    error: float
    tol: float
    note: str = ""
    skipped: bool = False
    key: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.skipped or self.error <= self.tol)


@dataclasses.dataclass
class Leaf:
    """Everything checked for one input leaf (``params['W']``, ``z``, …)."""
    leaf: str
    shape: tuple[int, ...]
    dtype: str
    autodiff: Comparison | None = None
    finite_differences: Comparison | None = None
    taylor: Taylor | None = None
    note: str = ""             # what was done with it: an integer leaf is not differentiated
    ok: bool = True            # an integer leaf: its cotangent was a float0 zero (or None)

    @property
    def passed(self) -> bool:
        parts = (self.autodiff, self.finite_differences, self.taylor)
        return self.ok and all(p.passed for p in parts if p is not None)


@dataclasses.dataclass
class Report:
    """The report of one ``verify_vjp`` call. ``str(report)`` is a table; ``to_json()``."""
    name: str
    dtype: str
    leaves: list[Leaf]
    checks: list[Check]
    residual_bytes: int | None = None
    residuals: list[str] = dataclasses.field(default_factory=list)
    mode: str = "VJP"          # or "JVP" (``jbackprop.check.forward.verify_jvp``)

    @property
    def passed(self) -> bool:
        return all(x.passed for x in self.leaves) and all(c.passed for c in self.checks)

    def failures(self) -> list[str]:
        """One line per failed part, naming the leaf, the worst index, both values, the tol."""
        out = []
        for leaf in self.leaves:
            if not leaf.ok:
                out.append(f"{self.name}: {leaf.leaf}: {leaf.note}")
            for what, c in (("autodiff", leaf.autodiff), ("finite differences", leaf.finite_differences)):
                if c is not None and not c.passed:
                    out.append(f"{self.name}: {leaf.leaf} vs {what}: error {c.error:.3g} > tol "
                               f"{c.tol:.3g}; worst at index {c.worst_index}: hand-written "
                               f"{c.actual!r}, expected {c.expected!r}" + (f" ({c.note})" if c.note else ""))
            if leaf.taylor is not None and not leaf.taylor.passed:
                t = leaf.taylor
                out.append(f"{self.name}: {leaf.leaf} Taylor test: second-order remainder shrinks "
                           f"at rate {t.rate2:.2f} < {t.min_rate2} (h = {t.h}, r2 = {t.r2}): the "
                           f"gradient is not the derivative")
        for c in self.checks:
            if not c.passed:
                out.append(f"{self.name}: {c.name}: error {c.error:.3g} > tol {c.tol:.3g}"
                           + (f" ({c.note})" if c.note else ""))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        for leaf, ld in zip(self.leaves, d["leaves"]):
            ld["passed"] = leaf.passed
            for k in ("autodiff", "finite_differences", "taylor"):
                if getattr(leaf, k) is not None:
                    ld[k]["passed"] = getattr(leaf, k).passed
        for c, cd in zip(self.checks, d["checks"]):
            cd["passed"] = c.passed
        return _finite(d)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def rows(self) -> list[tuple[str, ...]]:
        """Table rows: module · dtype · leaf · vs autodiff · vs finite diff · Taylor · bytes · pass."""
        rows = []
        for i, leaf in enumerate(self.leaves):
            rows.append((self.name, self.dtype, leaf.leaf, _fmt(leaf.autodiff) if leaf.autodiff or not leaf.note
                         else leaf.note, _fmt(leaf.finite_differences),
                         _fmt_taylor(leaf.taylor),
                         _fmt_bytes(self.residual_bytes) if i == 0 and self.mode == "VJP" else "",
                         "yes" if leaf.passed else "NO"))
        bad = [c.name for c in self.checks if not c.passed]
        done = [c for c in self.checks if not c.skipped]
        rows.append((self.name, self.dtype, f"(whole: {len(done)} checks)",
                     "FAILED: " + ", ".join(bad) if bad else "", "", "", "",
                     "yes" if not bad else "NO"))
        return rows

    def __str__(self) -> str:
        return format_table([self])


HEADER = ("module", "dtype", "leaf", "error vs autodiff", "error vs finite diff", "Taylor rate",
          "residual bytes", "pass")


def format_table(reports: Sequence[Report]) -> str:
    body = [r for rep in reports for r in rep.rows()]
    widths = [max(len(str(x)) for x in col) for col in zip(HEADER, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(HEADER), line(["-" * w for w in widths])] + [line(b) for b in body])


def summary_table(reports: Sequence[Report]) -> str:
    """One row per check over many reports: how many ran, passed, failed and were skipped, and
    the worst ``error / tol`` (``jbackprop check`` prints it after the per-leaf table); the
    checks of a JVP report are marked ``(JVP)``."""
    stats: dict[str, list] = {}

    def add(key, passed, skipped, ratio):
        row = stats.setdefault(key, [0, 0, 0, 0.0])
        row[0 if skipped else (1 if passed else 2)] += 1
        row[3] = max(row[3], ratio)
    for rep in reports:
        mode = "" if rep.mode == "VJP" else f" ({rep.mode})"
        for leaf in rep.leaves:
            for key in ("autodiff", "finite_differences", "taylor"):
                part = getattr(leaf, key)
                if part is not None:
                    ratio = part.error / part.tol if isinstance(part, Comparison) and part.tol else 0.0
                    add(key + mode, part.passed, False, ratio)
        for c in rep.checks:
            add((c.key or c.name) + mode, c.passed, c.skipped,
                0.0 if c.skipped or c.error == 0 else (c.error / c.tol if c.tol else math.inf))
    header = ("check", "skipped", "passed", "failed", "worst error / tol")
    body = [(k, str(sk), str(ok), str(bad), f"{r:.2g}") for k, (sk, ok, bad, r) in stats.items()]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def _fmt(c: Comparison | None) -> str:
    if c is None:
        return "-"
    return f"{c.error:.1e} (tol {c.tol:.0e})" + (" " + c.note if c.note else "")


def _fmt_taylor(t: Taylor | None) -> str:
    if t is None:
        return "-"
    if t.exact:
        return "exact (linear)"
    return f"{t.rate1:.2f} / " + ("→ round-off" if t.converged and t.rate2 < t.min_rate2 else f"{t.rate2:.2f}")


def _fmt_bytes(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _finite(x):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def saved_residuals(f, leaves, labels) -> tuple[int | None, list[str]]:
    """Bytes and descriptions of what the forward of ``f(*leaves)`` saves for the backward, from
    ``jax.ad_checkpoint.print_saved_residuals`` (argument ``l[k]`` is named ``labels[k]``)."""
    from jax.ad_checkpoint import print_saved_residuals
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            print_saved_residuals(f, *leaves)
    except Exception:  # noqa: BLE001 — not every function can be inspected
        return None, []
    lines = [re.sub(r"argument l\[(\d+)\]", lambda m: labels[int(m.group(1))], ln)
             for ln in buf.getvalue().splitlines() if ln.strip()]
    return sum(_aval_bytes(ln) for ln in lines), lines


_SIZES = {"f64": 8, "f32": 4, "f16": 2, "bf16": 2, "i64": 8, "i32": 4, "i16": 2, "i8": 1,
          "u64": 8, "u32": 4, "u8": 1, "bool": 1, "c64": 8, "c128": 16}


def _aval_bytes(line: str) -> int:
    m = re.match(r"\s*(\w+)\[([\d,\s]*)\]", line)
    if not m:
        return 0
    dims = [int(s) for s in m.group(2).split(",") if s.strip()]
    return _SIZES.get(m.group(1), 4) * math.prod(dims)

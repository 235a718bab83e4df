"""Finite differences that find their own step, kinks from behaviour, local scales and the
Taylor test: the checker's float64 numerics (``jbackprop.check.engine`` calls them).

**Steps from behaviour, not from ``|x|``.** A central difference
``D(h) = (J(x + h s) − J(x − h s)) / 2h`` has a truncation error ``O(h²)`` on the scale on which
``J`` varies, and a round-off error ``O(ε|J|/h)``. Neither scale is known in advance: layer norm
at ``1000 + N(0, 1)`` varies on a scale of 1, not 1000, and cross-entropy at logits
``10⁴ + N(0, 1)`` loses four digits to cancellation. So ``central_differences`` evaluates ``D``
at the ladder ``h_k = h₀ 2^{-k}`` (``h₀ = ε^{1/3} max(1, |x|)``, ``k = 0 … LEVELS − 1``) in one
batched call, and takes for each comparand the level where two consecutive differences agree
best; their disagreement (plus the round-off) is the estimate's own error, ``noise``, which a
comparison subtracts before it judges.

**Kinks from behaviour.** At the chosen step, a kink (ReLU at 0) shows as a one-sided gap
``J(x+h) − 2J(x) + J(x−h)`` that does not halve with ``h``; ``z²`` at 0, whose gap halves, is
smooth and checked (``kinks``).

**Local scale.** An element of a cotangent computed in a working precision cannot be more
accurate than its *condition*: how much it moves when every input and ``v`` move by their own
relative round-off. ``local_scale`` measures ``|∂e_i/∂t|`` along ``x ⊙ (1 + t r)``,
``v ⊙ (1 + t r')`` (random ``r``, ``r'``; the largest of three draws) by central differences of a
float64 cotangent function ``e``. Each element is then judged against ``|e_i| + scale_i``, never
against the largest element of its leaf.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jbackprop.check.arrays import normal
from jbackprop.check.report import Taylor

EPS64 = float(np.finfo(np.float64).eps)
FD_TOL = 1e-6             # float64 finite differences (their own error is estimated and removed)
LEVELS = 10                        # h₀ … h₀/512
_LADDER = 2.0 ** -np.arange(LEVELS)
SCALE_STEP = 1e-6                  # relative step of ``local_scale`` (never crosses a kink at 0)
SCALE_DRAWS = 3


def ladder_multipliers() -> np.ndarray:
    """``[+2^0, …, +2^{-(L-1)}, −2^0, …, −2^{-(L-1)}]``: the signed steps, in units of ``h₀``."""
    return np.concatenate([_LADDER, -_LADDER])


def central_differences(J_at, R_at, h0, still=0.0):
    """The best central difference of each comparand from its values on the ladder.

    Args:
      J_at: ``(2 L, m)`` values of ``ΔJ = J(x + c h₀ s) − J(x)`` for ``c`` in
        ``ladder_multipliers()`` (differences taken per output element before summing, so an
        output that does not move contributes no round-off).
      R_at: ``(2 L, m)`` their round-off magnitudes (``J``'s terms that moved, in absolute value).
      h0: ``(m,)`` the base step of each comparand.
      still: ``(m,)`` the ``|v f|`` of the outputs that did not move even at the probe.

    Returns:
      ``(value, noise, kink, step)``, each ``(m,)``: the central difference at the chosen level,
      an estimate of its error (truncation, from the disagreement with the next larger step,
      and round-off), where ``J`` has a kink within the step, and the chosen step.
    """
    J_at, R_at, h0 = (np.asarray(a, np.float64) for a in (J_at, R_at, h0))
    Jp, Jm = J_at[:LEVELS], J_at[LEVELS:]
    h = _LADDER[:, None] * h0[None, :]
    D = (Jp - Jm) / (2 * h)
    roundoff = 1e2 * EPS64 * (R_at[:LEVELS] + R_at[LEVELS:]) / h
    disagreement = np.abs(D[:-1] - D[1:]) + roundoff[1:]
    k = np.argmin(disagreement, axis=0)          # the level h_k against h_{k+1}
    cols = np.arange(h0.size)
    value = D[k + 1, cols]
    noise = disagreement[k, cols] + 4 * EPS64 * np.asarray(still, np.float64) / (PROBE * h0)
    kink = kinks(Jp[k, cols], Jm[k, cols], Jp[k + 1, cols], Jm[k + 1, cols], h[k, cols],
                 roundoff[k, cols])
    return value, noise, kink, h[k + 1, cols]


def kinks(Jp, Jm, Jp2, Jm2, h, roundoff) -> np.ndarray:
    """Where ``J`` is not smooth within ``h`` (``J*`` are differences from ``J(x)``): the
    one-sided differences at ``h`` disagree (by more than a tenth, and more than 1e-6 of the
    largest slope), *and* the disagreement does not behave as a smooth function's would at
    ``h/2``.

    For a smooth ``J`` the gap ``fwd − bwd = (J(x+h) − 2J(x) + J(x−h))/h ≈ h J''`` halves with
    the step and the central differences at ``h`` and ``h/2`` agree (to ``O(h²)``); at a kink
    the gap stays (ReLU at 0), and within ``h`` of one the two central differences disagree.
    So ``z²`` at 0, whose gap is ``2h`` but halves, is smooth and checked."""
    fwd, bwd = Jp / h, -Jm / h
    gap, gap2 = fwd - bwd, (Jp2 + Jm2) / (h / 2)
    fd, fd2 = (Jp - Jm) / (2 * h), (Jp2 - Jm2) / h
    disagree = (np.abs(gap) > 0.1 * (np.abs(fwd) + np.abs(bwd))) \
        & (np.abs(gap) > 1e-6 * (np.max(np.abs(fd), initial=0.0) + 1e-300))
    smooth = (np.abs(gap2 - gap / 2) <= 0.25 * np.abs(gap) + 4 * roundoff) \
        & (np.abs(fd - fd2) <= 1e-6 * (np.abs(fd) + np.abs(fd2)) + roundoff)
    return np.asarray(disagree & ~smooth)


def scalar_derivative(S: Callable, h0: float):
    """``(dS/ds at 0, noise)`` by the ladder, where ``S(steps)`` gives ``moved`` of the outputs
    at the steps ``s`` (the ladder, then the probe)."""
    dJ, R, still = (np.asarray(a, np.float64)[:-1, None] for a in S(jnp.asarray(ladder_and_probe() * h0)))
    value, noise, _, _ = central_differences(dJ, R, np.asarray([h0]), still[0])
    return float(value[0]), float(noise[0])


PROBE = 1e4               # a probe step of 10⁴ h₀ (≈ 0.06 max(1, |x|)) tells dependence


def ladder_and_probe() -> np.ndarray:
    """The signed ladder steps, then the probe (in units of ``h₀``)."""
    return np.concatenate([ladder_multipliers(), [PROBE]])


def moved(outs, base, v):
    """``(⟨v, out_s − base⟩, round-off_s, still)`` for a stack of outputs ``outs`` (leading axis
    ``s``) of one comparand, differences taken per output element, so that an output that does
    not depend on the shifted input contributes no round-off. An output *moved* if it changed at
    any of the shifts — the last is a large probe step: ``round-off_s = ⟨|v|, |out_s| + |base|⟩``
    over those. ``still = ⟨|v|, |base|⟩`` over the others: each is independent of the input, or
    its derivative is below ``ε |f| / probe`` — which the comparison allows for."""
    dJ, R, still = 0.0, 0.0, 0.0
    for a, b, w in zip(jax.tree.leaves(outs), jax.tree.leaves(base), jax.tree.leaves(v)):
        w = jnp.asarray(w, jnp.result_type(a))
        depends = jnp.any(a != b, axis=0)
        dJ = dJ + jnp.sum((a - b) * w, axis=tuple(range(1, a.ndim)))
        R = R + jnp.sum(jnp.where(depends, jnp.abs(w) * (jnp.abs(a) + jnp.abs(b)), 0.0),
                        axis=tuple(range(1, a.ndim)))
        still = still + jnp.sum(jnp.where(depends, 0.0, jnp.abs(w * b)))
    return dJ, R, jnp.broadcast_to(still, jnp.shape(dJ))


def base_step(x) -> np.ndarray:
    """``h₀ = ε^{1/3} max(1, |x|)`` per element, in float64: the top of the ladder."""
    return EPS64 ** (1 / 3) * np.maximum(1.0, np.abs(np.asarray(x, np.float64)))


def local_scale(cotangents: Callable[[Sequence, object], Sequence], leaves: Sequence, v,
                seed: int) -> list[np.ndarray]:
    """Per element of every leaf ``e`` returns (cotangents, or outputs): ``max |∂e_i/∂t|`` over three draws of
    ``x ⊙ (1 + t r), v ⊙ (1 + t r')``, where ``e = cotangents(leaves, v)`` runs in float64.

    The relative perturbation keeps every input's sign, so a kink at 0 (ReLU) is never crossed."""
    h = SCALE_STEP
    scale = None
    for k in range(SCALE_DRAWS):
        r = [normal(seed, 3000 + 100 * k + j, np.shape(x), jnp.float64) for j, x in enumerate(leaves)]
        rv = jax.tree.map(lambda a: normal(seed, 3050 + k, np.shape(a), jnp.float64), v)
        at = lambda s: cotangents([x * (1 + s * ri) for x, ri in zip(leaves, r)],
                                  jax.tree.map(lambda a, b: a * (1 + s * b), v, rv))
        slopes = [np.abs(np.asarray(p, np.float64) - np.asarray(m, np.float64)) / (2 * h)
                  for p, m in zip(at(h), at(-h))]
        scale = slopes if scale is None else [np.maximum(a, b) for a, b in zip(scale, slopes)]
    return scale


TAYLOR_H = [1e-2 * 2.0 ** -k for k in range(16)]


def taylor(J_steps: Callable, x, g, unit, kink, seed: int) -> Taylor:
    """Remainders of ``J`` along ``δ = r ⊙ unit`` (``unit``: the scale on which ``J`` varies
    at each element, from the finite differences' chosen steps; zero at their kinks).
    ``J_steps(dxs)`` gives ``(J(x + dx) − J(x), round-off)`` for ``(1, steps, *x.shape)`` shifts
    (the last a probe)."""
    d, steps = taylor_steps(x, unit, kink, seed)
    return taylor_from(J_steps(steps), g, d)


def taylor_steps(x, unit, kink, seed: int):
    """``(δ, shifts)``: the Taylor direction and its ``(1, steps, *x.shape)`` shifts."""
    d = normal(seed, 77, np.shape(x), jnp.float64) * jnp.asarray(unit, jnp.float64)
    if kink is not None:
        d = jnp.where(kink, 0.0, d)
    steps = jnp.asarray(TAYLOR_H + [PROBE * TAYLOR_H[0]], jnp.float64).reshape((-1,) + (1,) * jnp.ndim(x)) * d
    return d, steps.astype(jnp.result_type(x))[None]


def taylor_from(moved_out, g, d) -> Taylor:
    """The Taylor remainders from ``(J(x + dx) − J(x), round-off, still)`` at ``taylor_steps``."""
    dJ, R, still = (np.asarray(a, np.float64)[0, :-1] for a in moved_out)
    slope, hs = float(jnp.vdot(jnp.asarray(g, jnp.float64), d)), TAYLOR_H
    r1 = [float(abs(J)) for J in dJ]
    r2 = [float(abs(J - h * slope)) for J, h in zip(dJ, hs)]
    floor = [1e3 * EPS64 * (r + s + abs(h * slope)) + 1e-300 for r, s, h in zip(R, still, hs)]
    exact = all(r <= f for r, f in zip(r2, floor))
    converged = all(r <= f for r, f in zip(r2[-3:], floor[-3:]))
    return Taylor(hs, r1, r2, _rate(r1, floor), _rate(r2, floor), exact, converged)


def _rate(r, floor) -> float:
    """Mean of the last three rates log2(r_k / r_{k+1}) over remainders above the floor."""
    rates = [math.log2(a / b) for a, b, fa, fb in zip(r, r[1:], floor, floor[1:]) if a > fa and b > fb]
    return float(np.mean(rates[-3:])) if rates else float("nan")

"""Draw the data-flow figures of the documentation (matplotlib only, no graphviz).

    python docs/make_figures.py [OUT_DIR]        # default: docs/images

writes ``mlp_dataflow.png`` (Algorithm 3 on an MLP with one hidden layer) and
``residual_dataflow.png`` (the residual block ``z + σ(MM2(σ(MM1(z))))``). Forward arrows are
blue and carry the values; every module box says what its forward keeps for the backward (the
residuals); backward arrows are red and carry ``v = ∂J/∂(output)`` and ``B[M, z](v)``;
``B[M, θ](v)``, the parameter gradients, leave the modules downwards.
``tests/test_docs.py`` runs this script, so the figures cannot drift from it.
"""
from __future__ import annotations

import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

FORWARD, BACKWARD, KEPT, PARAM = "#1f4e9c", "#b8322a", "#555555", "#7a4f9a"
BOX_W, BOX_H, GAP = 2.4, 1.5, 2.7          # module box size and the space between boxes
LANE = 0.3                                 # forward lane at +LANE, backward lane at -LANE
INCH = 0.5                                 # figure inches per data unit (the same for both)


def _box(ax, x, title, kept):
    """A module box centred at (x, 0): its name, and what its forward keeps."""
    ax.add_patch(FancyBboxPatch((x - BOX_W / 2, -BOX_H / 2), BOX_W, BOX_H,
                                boxstyle="round,pad=0.02,rounding_size=0.15",
                                fc="#eef2fa", ec="#333333", lw=1.3))
    ax.text(x, 0.32, title, ha="center", va="center", fontsize=15)
    ax.text(x, -0.33, "keeps\n" + kept, ha="center", va="center", fontsize=10, color=KEPT,
            style="italic", linespacing=1.3)


def _arrow(ax, start, end, color, label=None, below=False, rad=0.0, fontsize=11.5):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, lw=1.8,
                                 color=color, connectionstyle=f"arc3,rad={rad}",
                                 shrinkA=0, shrinkB=0))
    if label:
        x, y = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
        ax.text(x, y + (-0.12 if below else 0.1), label, ha="center",
                va="top" if below else "bottom", fontsize=fontsize, color=color,
                linespacing=1.6)


def _chain(ax, xs, ends, forward_labels, backward_labels):
    """Forward arrows left to right and backward arrows right to left between boxes/points."""
    for k, (a, b) in enumerate(zip(ends[:-1], ends[1:])):
        a_edge = a + (BOX_W / 2 if a in xs else 0)
        b_edge = b - (BOX_W / 2 if b in xs else 0)
        _arrow(ax, (a_edge, LANE), (b_edge, LANE), FORWARD, forward_labels[k])
        _arrow(ax, (b_edge, -LANE), (a_edge, -LANE), BACKWARD, backward_labels[k], below=True)


def _param_gradient(ax, x, label):
    """B[M, θ](v): an arrow down out of the module box."""
    _arrow(ax, (x, -BOX_H / 2), (x, -1.75), PARAM)
    ax.text(x, -1.85, label, ha="center", va="top", fontsize=11.5, color=PARAM,
            linespacing=1.6)


def _legend(ax, x, y, width):
    entries = [(FORWARD, "forward: the values, left to right"),
               (BACKWARD, r"backward, right to left: $v = \partial J/\partial(\mathrm{output})$"
                          r" in, $B[M, z](v)$ out"),
               (PARAM, r"parameter gradients $B[M, \theta](v)$"),
               (KEPT, "keeps: the residuals the forward saves for the backward")]
    for k, (color, text) in enumerate(entries):
        x0, y0 = x + (k // 2) * width / 2, y - 0.45 * (k % 2)
        ax.plot([x0, x0 + 0.6], [y0, y0], color=color, lw=3)
        ax.text(x0 + 0.8, y0, text, va="center", fontsize=11.5)


def _figure(xlim, ylim):
    fig = plt.figure(figsize=((xlim[1] - xlim[0]) * INCH, (ylim[1] - ylim[0]) * INCH))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


def _save(fig, path):
    fig.savefig(path, dpi=110, facecolor="white")
    plt.close(fig)


def _modules(ax, rows, left, right, last):
    """A row of module boxes from x = 0, with the forward and backward arrows from ``left`` (a
    point before the first box) through the boxes to ``right``. Each row of ``rows`` is
    ``(module, what it keeps, its input, ∂J/∂input, the B[M, z](·) that computes it)`` in TeX;
    ``last`` labels the arrows after the last box (forward, backward). Returns the boxes' x."""
    xs = [k * (BOX_W + GAP) for k in range(len(rows))]
    for x, (module, kept, *_) in zip(xs, rows):
        _box(ax, x, f"${module}$", kept)
    forward = [f"${value}$" for _, _, value, _, _ in rows] + [last[0]]
    backward = [f"${bar}$\n$= {formula}$" for *_, bar, formula in rows] + [last[1]]
    _chain(ax, xs, [left] + xs + [right], forward, backward)
    return xs


def mlp_dataflow(path):
    """Algorithm 3 on the MLP x → MM₁ → σ → MM₂ → ℓ(·, y) → J (one hidden layer, σ = ReLU)."""
    x_in, x_out = -BOX_W / 2 - 2.4, 3 * (BOX_W + GAP) + BOX_W / 2 + 1.6
    xlim = (x_in - 0.8, x_out + 0.8)
    fig, ax = _figure(xlim, (-4.1, 2.1))
    d = r"\partial J/\partial "
    xs = _modules(ax, [
        (r"\mathrm{MM}_1", r"$W^{[1]}, x$", "x", d + "x", r"B[\mathrm{MM}_1, z](v)"),
        (r"\sigma", r"$1\{z^{[1]} > 0\}$", "z^{[1]}", d + "z^{[1]}", r"B[\sigma, z](v)"),
        (r"\mathrm{MM}_2", r"$W^{[2]}, a^{[1]}$", "a^{[1]}", d + "a^{[1]}",
         r"B[\mathrm{MM}_2, z](v)"),
        (r"\ell(\cdot, y)", r"softmax$(t)$, $y$", "t = z^{[2]}", d + "t", r"B[\ell, t](v)"),
    ], x_in, x_out, (r"$J$", r"$v = 1$"))
    for k, x in ((1, xs[0]), (2, xs[2])):
        _param_gradient(ax, x, rf"${d}W^{{[{k}]}},\ {d}b^{{[{k}]}}$" + "\n"
                               rf"$= B[\mathrm{{MM}}_{k}, \theta](v)$")
    ax.text(sum(xlim) / 2, 1.6, "An MLP with one hidden layer: forward, then backward "
            "(Algorithm 3)", ha="center", fontsize=14, weight="bold")
    _legend(ax, xlim[0] + 0.3, -3.3, xlim[1] - xlim[0])
    _save(fig, path)


def residual_dataflow(path):
    """Res(z) = z + σ(MM₂(σ(MM₁(z)))): the skip adds v to the inner branch's B[inner, z](v)."""
    split, plus = -BOX_W / 2 - 3.3, 3 * (BOX_W + GAP) + BOX_W / 2 + 1.7
    out = plus + 1.9
    xlim = (split - 4.6, out + 0.6)
    fig, ax = _figure(xlim, (-5.5, 3.6))
    xs = _modules(ax, [
        (r"\mathrm{MM}_1", r"$W_1, z$", "z", r"B[\mathrm{inner}, z](v)",
         r"B[\mathrm{MM}_1, z](\bar a_1)"),
        (r"\sigma", r"none (uses $h_1$)", "a_1", r"\bar a_1", r"B[\sigma, z](\bar h_1)"),
        (r"\mathrm{MM}_2", r"$W_2, h_1$", "h_1", r"\bar h_1", r"B[\mathrm{MM}_2, z](\bar a_2)"),
        (r"\sigma", r"$1\{a_2 > 0\}$", "a_2", r"\bar a_2", r"B[\sigma, z](v)"),
    ], split, plus - 0.3, (r"$h_2$", r"$v$"))
    for k, x in ((1, xs[0]), (2, xs[2])):
        _param_gradient(ax, x, rf"$\bar W_{k}, \bar b_{k}$" + "\n"
                               rf"$= B[\mathrm{{MM}}_{k}, \theta](\bar a_{k})$")
    ax.add_patch(plt.Circle((plus, 0), 0.3, fc="white", ec="#333333", lw=1.3))
    ax.text(plus, 0, "+", ha="center", va="center", fontsize=17)
    ax.plot([split], [0], "o", color="#333333", ms=9)
    # the identity branch: forward above the blocks, backward below them
    top, bottom, middle = 2.0, -3.4, (split + plus) / 2
    ax.plot([split, split, plus], [0, top, top], color=FORWARD, lw=1.8)
    _arrow(ax, (plus, top), (plus, 0.3), FORWARD)
    ax.text(middle, top + 0.1, r"identity: $z$", ha="center", va="bottom", fontsize=12,
            color=FORWARD)
    ax.plot([plus, plus, split], [-0.3, bottom, bottom], color=BACKWARD, lw=1.8)
    _arrow(ax, (split, bottom), (split, -0.12), BACKWARD)
    ax.text(middle, bottom - 0.12, r"identity: $v$ passes unchanged", ha="center", va="top",
            fontsize=12, color=BACKWARD)
    _arrow(ax, (plus + 0.3, LANE), (out, LANE), FORWARD, r"$\mathrm{Res}(z)$")
    _arrow(ax, (out, -LANE), (plus + 0.3, -LANE), BACKWARD, r"$v$", below=True)
    ax.text(split - 0.35, 0.05, r"$z$", ha="right", va="center", fontsize=15)
    ax.text(split - 0.35, -0.55, r"$\bar z = v + B[\mathrm{inner}, z](v)$" + "\n"
            "gradients add where\nthe branches meet", ha="right", va="top", fontsize=12,
            color=BACKWARD, linespacing=1.6)
    ax.text(sum(xlim) / 2, 3.0, r"The residual block $\mathrm{Res}(z) = z + \sigma(\mathrm{MM}_2"
            r"(\sigma(\mathrm{MM}_1(z))))$: one module, its backward chained from its parts' "
            "pullbacks",
            ha="center", fontsize=14, weight="bold")
    _legend(ax, xlim[0] + 0.3, -4.7, xlim[1] - xlim[0])
    _save(fig, path)


def main(out_dir="docs/images"):
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mlp_dataflow(out / "mlp_dataflow.png")
    residual_dataflow(out / "residual_dataflow.png")
    return [out / "mlp_dataflow.png", out / "residual_dataflow.png"]


if __name__ == "__main__":
    for p in main(*sys.argv[1:]):
        print(p)

"""Verify hand-written backwards: against ``jax.grad`` of a reference, and finite differences.

``verify(fn, reference, args)`` compares the gradient that ``jax.grad`` computes through ``fn``
(which runs its hand-written ``custom_vjp`` rule) with ``jax.grad`` of the pure-jnp
``reference``, leaf by leaf, and with float64 central finite differences along a random
direction. ``library_report()`` does so for every module and model of jbackprop.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# (autodiff, finite differences) relative tolerances by dtype
TOLERANCES = {"float64": (1e-10, 1e-6), "float32": (2e-4, 2e-3)}


@dataclasses.dataclass
class Row:
    module: str
    dtype: str
    leaf: str
    err_autodiff: float
    err_fd: float
    tol_autodiff: float
    tol_fd: float

    @property
    def passed(self) -> bool:
        return self.err_autodiff <= self.tol_autodiff and self.err_fd <= self.tol_fd


def _rel_err(a, e) -> float:
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    return float(np.max(np.abs(a - e), initial=0.0) / (np.max(np.abs(e), initial=0.0) + 1e-30))


def _floats(args, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                        args)


def verify(name: str, fn: Callable, reference: Callable, args: Sequence[Any],
           dtype=jnp.float64, seed: int = 0) -> list[Row]:
    """Rows comparing ``jax.grad`` through ``fn`` with ``reference``, one per float input leaf."""
    dname = jnp.dtype(dtype).name
    tol_ad, tol_fd = TOLERANCES[dname]
    args = _floats(tuple(args), dtype)
    argnums = tuple(i for i, a in enumerate(args)
                    if all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(a)))
    key = jax.random.PRNGKey(seed)
    out = jax.eval_shape(reference, *args)
    c = jax.random.normal(key, out.shape, out.dtype)
    J = lambda f: lambda *a: jnp.sum(c.astype(jnp.result_type(f(*a))) * f(*a))
    g = jax.jit(jax.grad(J(fn), argnums))(*args)
    g_ref = jax.jit(jax.grad(J(reference), argnums))(*args)

    # finite differences in float64 on the reference, one random direction per leaf
    args64 = _floats(args, jnp.float64)
    J64 = lambda *a: jnp.sum(c.astype(jnp.float64) * reference(*a))
    rows = []
    leaves, _ = jax.tree_util.tree_flatten_with_path(dict(zip(map(str, argnums), g)))
    ref_leaves = jax.tree.leaves(g_ref)
    for (path, gl), rl in zip(leaves, ref_leaves):
        i = int(path[0].key)
        sub = path[1:]
        d = jax.random.normal(jax.random.fold_in(key, len(rows) + 1), gl.shape, jnp.float64)
        # float64 central differences: step ε^(1/3) times the input's scale
        scale = max(1.0, float(np.max(np.abs(_get(args64[i], sub)), initial=0.0)))
        h = float(np.finfo(np.float64).eps) ** (1 / 3) * scale

        def at(s):
            a = list(args64)
            a[i] = _set(a[i], sub, _get(a[i], sub) + s * h * d)
            return J64(*a)
        fd = float((at(1.0) - at(-1.0)) / (2 * h))
        slope = float(jnp.vdot(gl.astype(jnp.float64), d))
        norm = float(np.sqrt(np.sum(np.asarray(rl, np.float64) ** 2)))
        err_fd = abs(fd - slope) / (abs(fd) + norm + 1e-30)
        leaf = _arg_name(fn, i) + "".join(f"[{p.key!r}]" if hasattr(p, "key") else f"[{p.idx}]"
                                   for p in sub)
        rows.append(Row(name, dname, leaf, _rel_err(gl, rl), err_fd, tol_ad, tol_fd))
    return rows


def _arg_name(fn, i: int) -> str:
    import inspect
    try:
        return list(inspect.signature(fn).parameters)[i]
    except (TypeError, ValueError, IndexError):
        return f"arg{i}"


def _get(tree, path):
    for p in path:
        tree = tree[p.key if hasattr(p, "key") else p.idx]
    return tree


def _set(tree, path, value):
    if not path:
        return value
    p = path[0]
    k = p.key if hasattr(p, "key") else p.idx
    if isinstance(tree, dict):
        return {**tree, k: _set(tree[k], path[1:], value)}
    t = list(tree)
    t[k] = _set(t[k], path[1:], value)
    return type(tree)(t)


def _normal(key, *shape):
    return jax.random.normal(key, shape)


def library_cases(key=None) -> list[tuple[str, Callable, Callable, tuple]]:
    """``(name, module, reference, args)`` for every module and model of jbackprop."""
    import jbackprop as jb
    from jbackprop import reference as ref

    ks = iter(jax.random.split(jax.random.PRNGKey(0) if key is None else key, 64))
    n = lambda *shape: _normal(next(ks), *shape)
    z = n(7, 5)
    mmp = {"W": n(4, 5), "b": n(4)}
    res_p = {"mm1": {"W": n(5, 5) / 2, "b": n(5)}, "mm2": {"W": n(5, 5) / 2, "b": n(5)}}
    mlp_p = jb.mlp_init(next(ks), [5, 8, 6, 3], jnp.float64)
    rs_p = jb.resnet_s_init(next(ks), 5, 6, 3, 3, jnp.float64)
    rs_p["blocks"]["mm2"]["W"] = rs_p["blocks"]["mm2"]["W"] * 3
    partial = functools.partial
    acts = [("relu", jb.relu, ref.relu), ("sigmoid", jb.sigmoid, ref.sigmoid),
            ("tanh", jb.tanh, ref.tanh), ("leaky_relu", jb.leaky_relu, ref.leaky_relu),
            ("gelu", jb.gelu, ref.gelu),
            ("gelu(tanh)", partial(jb.gelu, approximate=True), partial(ref.gelu, approximate=True)),
            ("softplus(β=2)", partial(jb.softplus, beta=2.0), partial(ref.softplus, beta=2.0)),
            ("elu", jb.elu, ref.elu)]
    cases = [(name, f, r, (z,)) for name, f, r in acts]
    cases += [
        ("mm", jb.mm, ref.mm, (mmp, n(5))),
        ("layer_norm_s", jb.layer_norm_s, ref.layer_norm_s, (z,)),
        ("layer_norm", jb.layer_norm, ref.layer_norm, ({"beta": n(5), "gamma": n(5)}, z)),
        ("conv1d_s", jb.conv1d_s, ref.conv1d_s, ({"w": n(3), "b": n()}, n(9))),
        ("conv1d", jb.conv1d, ref.conv1d, ({"w": n(3, 2, 4), "b": n(4)}, n(9, 2))),
        ("conv2d_s", jb.conv2d_s, ref.conv2d_s, ({"w": n(3, 3), "b": n()}, n(5, 6))),
        ("conv2d", jb.conv2d, ref.conv2d, ({"w": n(3, 3, 2, 3), "b": n(3)}, n(5, 6, 2))),
        ("mse_loss", jb.mse_loss, ref.mse_loss, (n(4), n(4))),
        ("logistic_loss", jb.logistic_loss, ref.logistic_loss, (n(), jnp.float32(1.0))),
        ("cross_entropy_loss", jb.cross_entropy_loss, ref.cross_entropy_loss,
         (n(6), jnp.int32(2))),
        ("residual", jb.residual, ref.residual, (res_p, n(5))),
        ("mlp", jb.mlp, ref.mlp, (mlp_p, n(5))),
        ("resnet_s", jb.resnet_s, ref.resnet_s, (rs_p, n(5))),
    ]
    # batched: the per-example module under jax.vmap (the batching dispatch path)
    cases.append(("vmap(mm)", jax.vmap(jb.mm, (None, 0)), jax.vmap(ref.mm, (None, 0)),
                  (mmp, n(3, 5))))
    cases.append(("vmap(mlp)", jax.vmap(jb.mlp, (None, 0)), jax.vmap(ref.mlp, (None, 0)),
                  (mlp_p, n(4, 5))))
    return cases


def library_report(module: str | None = None, dtypes=("float32", "float64")) -> list[Row]:
    """Verify every module and model (or those whose name contains ``module``) in ``dtypes``."""
    rows = []
    for name, fn, ref_fn, args in library_cases():
        if module and module not in name:
            continue
        for d in dtypes:
            rows += verify(name, fn, ref_fn, args, jnp.dtype(d))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    head = ("module", "dtype", "leaf", "err vs autodiff", "err vs finite diff", "pass")
    body = [(r.module, r.dtype, r.leaf, f"{r.err_autodiff:.1e} (tol {r.tol_autodiff:.0e})",
             f"{r.err_fd:.1e} (tol {r.tol_fd:.0e})", "yes" if r.passed else "NO")
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])

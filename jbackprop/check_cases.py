"""The cases ``jbackprop check`` runs: every module and model of the library, at two shapes,
with its pure-jnp reference."""
from __future__ import annotations

import functools
import jax
import jax.numpy as jnp

from jbackprop.check import verify_vjp
from jbackprop.check_report import Report


def library_cases(seed: int = 0) -> list[tuple]:
    """``(name, module, reference, args[, verify_vjp options])`` for every module and model."""
    import jbackprop as jb
    from jbackprop import reference as ref

    ks = iter(jax.random.split(jax.random.PRNGKey(seed), 128))
    n = lambda *shape: jax.random.normal(next(ks), shape, jnp.float64)
    P = functools.partial
    acts = [("relu", jb.relu, ref.relu), ("sigmoid", jb.sigmoid, ref.sigmoid),
            ("tanh", jb.tanh, ref.tanh), ("leaky_relu", jb.leaky_relu, ref.leaky_relu),
            ("gelu", jb.gelu, ref.gelu),
            ("gelu(tanh)", P(jb.gelu, approximate=True), P(ref.gelu, approximate=True)),
            ("softplus(β=2)", P(jb.softplus, beta=2.0), P(ref.softplus, beta=2.0)),
            ("elu", jb.elu, ref.elu)]
    cases = []
    for m, shape in ((5, (7, 5)), (16, (3, 4, 16))):   # two shapes of everything
        s = f"[{'x'.join(map(str, shape))}]"
        z = n(*shape)
        cases += [(name + s, f, r, (z,)) for name, f, r in acts]
        cases += [
            (f"mm[{m + 1}x{m}]", jb.mm, ref.mm, ({"W": n(m + 1, m), "b": n(m + 1)}, n(m))),
            ("layer_norm_s" + s, jb.layer_norm_s, ref.layer_norm_s, (z,)),
            ("layer_norm" + s, jb.layer_norm, ref.layer_norm, ({"beta": n(m), "gamma": n(m)}, z)),
            (f"conv1d_s[{2 * m}]", jb.conv1d_s, ref.conv1d_s, ({"w": n(3), "b": n()}, n(2 * m))),
            (f"conv1d[{m}x2]", jb.conv1d, ref.conv1d, ({"w": n(3, 2, 4), "b": n(4)}, n(m, 2))),
            (f"conv2d_s[{m}x6]", jb.conv2d_s, ref.conv2d_s, ({"w": n(3, 3), "b": n()}, n(m, 6))),
            (f"conv2d[{m}x6x2]", jb.conv2d, ref.conv2d, ({"w": n(3, 3, 2, 3), "b": n(3)}, n(m, 6, 2))),
            (f"mse_loss[{m}]", jb.mse_loss, ref.mse_loss, (n(m), n(m))),
            (f"logistic_loss[y={m % 2}]", jb.logistic_loss, ref.logistic_loss, (n(), jnp.float64(m % 2)),
             {"argnums": (0,)}),             # y is a label in {0, 1}: not differentiated
            (f"cross_entropy_loss[{m}]", jb.cross_entropy_loss, ref.cross_entropy_loss,
             (n(m), jnp.int32(m // 2))),
            (f"residual[{m}]", jb.residual, ref.residual,
             ({"mm1": {"W": n(m, m) / 2, "b": n(m)}, "mm2": {"W": n(m, m) / 2, "b": n(m)}}, n(m))),
        ]
        if m == 5:
            mlp_p = jb.mlp_init(next(ks), [5, 8, 6, 3], jnp.float64)
            rs_p = jb.resnet_s_init(next(ks), 5, 6, 3, 3, jnp.float64)
            rs_p["blocks"]["mm2"]["W"] = rs_p["blocks"]["mm2"]["W"] * 3   # make the blocks matter
            cases += [("mlp[5-8-6-3]", jb.mlp, ref.mlp, (mlp_p, n(5))),
                      ("resnet_s[w6,d3]", jb.resnet_s, ref.resnet_s, (rs_p, n(5)))]
    return cases


def _run(index: int, dtypes: tuple[str, ...]) -> list[Report]:
    name, fn, ref_fn, args, *opts = library_cases()[index]
    out = []
    for d in dtypes:
        cast = jax.tree.map(lambda a: a.astype(d) if jnp.issubdtype(a.dtype, jnp.floating) else a, args)
        out.append(verify_vjp(fn, *cast, reference=ref_fn, name=name, **(opts[0] if opts else {})))
    return out


def _worker_init():
    jax.config.update("jax_enable_x64", True)


def library_reports(module: str | None = None, dtypes=("float32", "float64"),
                    jobs: int = 1) -> list[Report]:
    """``verify_vjp`` of every case (or those whose name contains ``module``) in ``dtypes``,
    over ``jobs`` processes (JAX compiles on one core; the cases are independent)."""
    picked = [i for i, c in enumerate(library_cases()) if not module or module in c[0]]
    dtypes = tuple(dtypes)
    if jobs <= 1 or len(picked) < 2:
        return [r for i in picked for r in _run(i, dtypes)]
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init) as pool:
        return [r for rs in pool.map(_run, picked, [dtypes] * len(picked)) for r in rs]

"""Run by ``tests/test_shard_map.py`` in a fresh process that sees 4 CPU devices: every case of
the module registry differentiated inside ``jax.shard_map`` (default ``check_vma=True``), a
batch of 8 examples split over the mesh axis ``"data"``, parameters replicated.

For each case it prints (one JSON object) the largest relative difference of the gradients
against ``jax.grad`` of the same batched loss on one device, and against ``jax.grad`` of the
pure-jnp reference inside the same ``shard_map`` — or the exception, if one was raised; and
the same batched gradient under ``jax.jit`` on a mesh with an ``AxisType.Explicit`` axis
(``"explicit"``), the batch placed with ``NamedSharding(mesh, P("data"))``."""
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jbackprop.check.cases import cast_case, library_cases

jax.config.update("jax_enable_x64", True)
BATCH = 8


def rel_diff(a, b):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)), initial=0.0)
                     / max(np.max(np.abs(np.asarray(v, np.float64)), initial=0.0), 1e-300))
               for u, v in zip(a, b))


def batched_case(case, rng):
    """The batched arguments (all but a leading parameter pytree) stacked over 8 examples, the
    differentiated ones perturbed (labels are kept)."""
    args = cast_case(case.args, jnp.float64)
    argnums = case.options.get("argnums", tuple(range(len(args))))
    first = args[0]
    batched = tuple(range(1, len(args))) if isinstance(first, (dict, list, tuple)) and len(args) > 1 \
        else tuple(range(len(args)))
    stacked = [jax.tree.map(lambda a, i=i: jnp.stack([a + 0.1 * k * rng.standard_normal(a.shape)
                                                  if i in argnums and jnp.issubdtype(a.dtype, jnp.floating)
                                                  else a
                                                  for k in range(BATCH)]), a)
               if i in batched else a for i, a in enumerate(args)]
    return stacked, batched


def main():
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    explicit = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(0)
    results = {}
    for case in library_cases():
        args, batched = batched_case(case, rng)
        argnums = case.options.get("argnums", tuple(range(len(args))))
        in_axes = [0 if i in batched else None for i in range(len(args))]
        out = jax.eval_shape(lambda *a: jax.vmap(case.fn, in_axes)(*a), *args)
        V = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape)), out)

        def loss(fn, V, *a):
            ys = jax.vmap(fn, in_axes)(*a)
            return sum(jnp.sum(v * y) for v, y in zip(jax.tree.leaves(V), jax.tree.leaves(ys)))
        grad = lambda fn: lambda V, *a: jax.grad(lambda *a: loss(fn, V, *a), argnums)(*a)
        specs = tuple(P("data") if i in batched else P() for i in range(len(args)))
        out_specs = tuple(specs[i] for i in argnums)

        def sharded(fn):
            return jax.jit(jax.shard_map(grad(fn), mesh=mesh, in_specs=(P("data"),) + specs,
                                         out_specs=out_specs))
        try:
            one = jax.jit(grad(case.fn))(V, *args)
            many = sharded(case.fn)(V, *args)
            reference = sharded(case.reference)(V, *args)
            results[case.name] = {"vs_one_device": rel_diff(many, one),
                                  "vs_reference": rel_diff(many, reference)}
        except Exception as e:  # noqa: BLE001 — the test reports it
            results[case.name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        try:
            with (getattr(jax, "set_mesh", None) or jax.sharding.use_mesh)(explicit):
                placed = [jax.device_put(a, NamedSharding(explicit, spec)) for a, spec in zip(args, specs)]
                V_placed = jax.device_put(V, NamedSharding(explicit, P("data")))
                results[case.name]["explicit_vs_one_device"] = rel_diff(
                    jax.jit(grad(case.fn))(V_placed, *placed), one)
        except Exception as e:  # noqa: BLE001
            results[case.name]["explicit_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(results))


if __name__ == "__main__":
    main()

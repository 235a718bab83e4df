"""The ``jbackprop`` command line: ``jbackprop check`` verifies every hand-written backward."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _check(args: argparse.Namespace) -> int:
    import jax
    jax.config.update("jax_enable_x64", True)  # float64 finite differences and references
    from jbackprop.check_cases import library_reports
    from jbackprop.check_report import format_table

    dtypes = ("float32", "float64") if args.dtype == "all" else (args.dtype,)
    start = time.perf_counter()
    reports = library_reports(args.module, dtypes, jobs=args.jobs)
    if not reports:
        print(f"jbackprop check: no module matches {args.module!r}", file=sys.stderr)
        return 2
    print(format_table(reports))
    failed = [r for r in reports if not r.passed]
    for r in failed:
        print("\n".join(r.failures()))
    print(f"\n{len(reports) - len(failed)} passed, {len(failed)} failed "
          f"({len({r.name for r in reports})} module and model cases × dtypes "
          f"{', '.join(dtypes)}; {time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in reports], f, indent=1)
        print(f"wrote {args.json}")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jbackprop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="verify every module's hand-written backward against "
                                     "autodiff of a pure-jnp reference, finite differences, a "
                                     "Taylor test, and under jit, vmap and reverse-over-reverse")
    p.add_argument("--module", help="only cases whose name contains this (e.g. conv, mm)")
    p.add_argument("--dtype", choices=["float32", "float64", "all"], default="all")
    p.add_argument("--json", metavar="PATH", help="also write the reports as JSON")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="worker processes (default: cores, at most 4)")
    p.set_defaults(run=_check)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``jbackprop`` command line: ``jbackprop check`` verifies every hand-written backward."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _check(args: argparse.Namespace) -> int:
    import jax
    jax.config.update("jax_enable_x64", True)  # float64 finite differences need it
    from jbackprop import check

    dtypes = ("float32", "float64") if args.dtype == "all" else (args.dtype,)
    rows = check.library_report(args.module, dtypes)
    if not rows:
        print(f"jbackprop check: no module matches {args.module!r}", file=sys.stderr)
        return 2
    print(check.format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed "
          f"({len({r.module for r in rows})} modules and models, dtypes {', '.join(dtypes)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(dataclasses.asdict(r), passed=r.passed) for r in rows], f, indent=1)
        print(f"wrote {args.json}")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jbackprop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="verify every module's hand-written backward against "
                                     "jax.grad of a pure-jnp reference and finite differences")
    p.add_argument("--module", help="only modules whose name contains this")
    p.add_argument("--dtype", choices=["float32", "float64", "all"], default="all")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.set_defaults(run=_check)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

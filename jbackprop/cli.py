"""The ``jbackprop`` command line (also ``python -m jbackprop``): ``jbackprop check`` verifies every
hand-written backward; ``jbackprop train`` trains a model with them (it needs
``pip install "jbackprop[cli]"``); ``jbackprop bench`` times them against ``jax.grad``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from jbackprop.train.loop import Config


def _check(args: argparse.Namespace) -> int:
    import jax
    jax.config.update("jax_enable_x64", True)  # float64 finite differences and references
    from jbackprop.check.cases import library_reports
    from jbackprop.check.report import format_table, summary_table

    dtypes = ("float32", "float64") if args.dtype == "all" else (args.dtype,)
    start = time.perf_counter()
    reports = library_reports(args.module, dtypes, jobs=args.jobs)
    if not reports:
        print(f"jbackprop check: no module matches {args.module!r}", file=sys.stderr)
        return 2
    print(format_table(reports))
    print("\n" + summary_table(reports))
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


def _train(args: argparse.Namespace) -> int:
    from jbackprop.train import trainer

    if args.resume:
        try:
            _, _, saved = trainer.load_checkpoint(os.path.join(args.resume, trainer.CHECKPOINT))
            cfg = Config(**saved)
        except (FileNotFoundError, OSError, ValueError) as e:
            print(f"jbackprop train: --resume {args.resume}: {e}", file=sys.stderr)
            return 2
        out = args.resume
        if args.devices is not None:  # placement only: the same steps on other devices
            cfg = dataclasses.replace(cfg, devices=args.devices)
        print(f"resuming {out} at its saved configuration: {saved}")
    else:
        if args.input_noise is None:   # Config's noise suits the digits; the others get none
            args.input_noise = Config.input_noise if args.dataset == "digits" else 0.0
        if args.devices is None:
            args.devices = Config.devices
        try:   # Config refuses numbers that cannot train, naming the field
            cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
        except ValueError as e:
            print(f"jbackprop train: {e}", file=sys.stderr)
            return 2
        name = os.path.splitext(os.path.basename(args.dataset))[0]
        out = args.out or os.path.join("runs", f"{args.model}-{name}")
    try:
        metrics = trainer.fit(cfg, out, resume=bool(args.resume), progress=not args.no_progress)
    except trainer.NonFiniteLoss as e:
        print(f"jbackprop train: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, ImportError) as e:   # ImportError: the cli extra
        print(f"jbackprop train: {e}", file=sys.stderr)
        return 2
    final, metric = metrics["final"], metrics["metric"]
    value = final[f"test_{metric}"]
    shown = f"{100 * value:.2f} %" if metric == "accuracy" else f"{value:.4f}"
    print(f"test {metric} {shown} — {cfg.model} on {metrics['dataset']}, {cfg.epochs} epochs, "
          f"{cfg.backward} backward, {metrics['seconds_total']:.1f} s\n"
          f"metrics: {os.path.join(out, 'metrics.json')}\ncurves:  {os.path.join(out, 'curves.png')}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from jbackprop import bench
    try:
        return bench.main(args)
    except ValueError as e:
        print(f"jbackprop bench: {e}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jbackprop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="verify every module's hand-written backward against "
                                     "autodiff of a pure-jnp reference, finite differences, a "
                                     "Taylor test, and under jit, vmap and reverse-over-reverse")
    p.add_argument("--module", help="only cases whose name contains this (e.g. conv, mm; "
                                    "default: all)")
    p.add_argument("--dtype", choices=["float32", "float64", "all"], default="all",
                   help="default: %(default)s (both)")
    p.add_argument("--json", metavar="PATH", help="also write the reports as JSON")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="worker processes (default: cores, at most 4)")
    p.set_defaults(run=_check)

    # every field of Config is a flag (--batch-size for batch_size), its default Config's
    t = sub.add_parser("train", help="train a model with the hand-written backwards (default: "
                                     "an MLP on scikit-learn's handwritten digits; needs "
                                     'pip install "jbackprop[cli]")')
    t.add_argument("--model", choices=["mlp", "resnet-s", "cnn"], default=Config.model,
                   help="default: %(default)s")
    t.add_argument("--dataset", default=Config.dataset, help="digits | xor | housing | PATH.npz "
                   "(arrays x_train, y_train, x_test, y_test); default: %(default)s")
    t.add_argument("--optimizer", choices=["sgd", "momentum", "adam"], default=Config.optimizer,
                   help="adam is AdamW (decoupled weight decay); default: %(default)s")
    t.add_argument("--lr", type=float, default=Config.lr,
                   help="peak learning rate (see --schedule); default: %(default)s")
    t.add_argument("--schedule", choices=["cosine", "constant"], default=Config.schedule,
                   help="learning rate: cosine decay from --lr to 0 over the run, or constant; "
                        "default: %(default)s")
    t.add_argument("--batch-size", type=int, default=Config.batch_size, help="default: %(default)s")
    t.add_argument("--epochs", type=int, default=Config.epochs, help="default: %(default)s")
    t.add_argument("--seed", type=int, default=Config.seed,
                   help="initialisation, batches and noise (a seed reproduces a run exactly); "
                        "default: %(default)s")
    t.add_argument("--backward", choices=["manual", "autodiff"], default=Config.backward,
                   help="manual: jbackprop's hand-written rules; autodiff: jax.grad of the "
                        "pure-jnp reference of the same model; default: %(default)s")
    t.add_argument("--width", type=int, default=Config.width,
                   help="hidden units (MLP, ResNet-S); default: %(default)s")
    t.add_argument("--depth", type=int, default=Config.depth,
                   help="ResNet-S residual blocks; default: %(default)s")
    t.add_argument("--weight-decay", type=float, default=Config.weight_decay,
                   help="default: %(default)s")
    t.add_argument("--input-noise", type=float, default=None,
                   help="std of Gaussian noise on training inputs (default "
                        f"{Config.input_noise} for digits, else 0)")
    t.add_argument("--out", metavar="DIR", help="output folder (default runs/MODEL-DATASET)")
    t.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR, with its saved "
                                                   "configuration (only --devices may change)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--devices", type=int, default=None, metavar="N",
                   help=f"data parallel over N devices (default {Config.devices}; --batch-size "
                        "must be a multiple of N; on CPU set "
                        "XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    t.set_defaults(run=_train)

    b = sub.add_parser("bench", help="time whole training steps with the hand-written backward "
                                     "against jax.grad of the same mathematics (a table and JSON)")
    b.add_argument("--config", nargs="+", metavar="NAME",
                   help="only these configurations (default: all): mlp-large, mlp-small, "
                        "resnet-s, layernorm-net, conv1d, conv2d, xent-10k")
    b.add_argument("--quick", action="store_true",
                   help="small shapes and short runs: checks that the suite works, in seconds")
    b.add_argument("--budget", type=float, default=None,
                   help="seconds of timed rounds per configuration (default 4; 0.3 with --quick)")
    b.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="time each configuration N times (medians of the runs; the spread of "
                        "the manual/autodiff ratio is reported)")
    b.add_argument("--json", metavar="PATH", default="bench.json",
                   help="where to write the results (default bench.json)")
    b.add_argument("--plot", metavar="PNG", help="also draw the bar chart of step-time ratios")
    b.add_argument("--markdown", metavar="PATH", help="also write the tables as Markdown")
    b.add_argument("--no-external", action="store_true",
                   help="skip the PyTorch / Equinox columns even if installed")
    b.add_argument("--no-compile-depth", action="store_true",
                   help="skip the ResNet-S compile-time-against-depth probe")
    b.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

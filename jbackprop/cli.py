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

from jbackprop.train.loop import TRANSFORMER_DEFAULTS, Config


def _check(args: argparse.Namespace) -> int:
    if args.json:      # refused before any check runs (they take minutes)
        problem = _unwritable_file(args.json)
        if problem:
            print(f"jbackprop check: --json {args.json}: {problem}", file=sys.stderr)
            return 2
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
          f"({len({r.name for r in reports if r.mode == 'VJP'})} module and model cases × "
          f"both modes (VJP, JVP) × dtypes "
          f"{', '.join(dtypes)}; {time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in reports], f, indent=1)
        print(f"wrote {args.json}")
    return 1 if failed else 0


def _unwritable_file(path: str) -> str | None:
    """Why a file cannot be written at ``path`` (a folder there, no folder above it, no
    permission), or ``None``."""
    if os.path.isdir(path):
        return f"is a folder; give a file path, such as {os.path.join(path, 'check.json')}"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"its folder {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path)
                                                     and not os.access(path, os.W_OK)):
        return "is not writable (permission denied)"
    return None


def _unusable_folder(path: str) -> str | None:
    """Why ``path`` cannot be (or become) an output folder, or ``None``."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a folder"
    above = os.path.abspath(path)
    while not os.path.exists(above):        # the nearest existing folder above it
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        return f"cannot be created: {above} is a file, not a folder"
    if not os.access(above, os.W_OK | os.X_OK):
        return f"is not writable ({above}: permission denied)"
    return None


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _train(args: argparse.Namespace) -> int:
    from jbackprop.train import trainer

    def refuse(message: str) -> int:
        print(f"jbackprop train: {message}", file=sys.stderr)
        return 2
    fields = [f.name for f in dataclasses.fields(Config)]
    given = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}   # explicit flags
    if args.resume:
        out = args.resume
        if args.overwrite:
            return refuse(f"--overwrite cannot be combined with --resume {out}: --resume continues "
                          "the run in that folder, --overwrite starts a new one over it")
        if args.out is not None and os.path.realpath(args.out) != os.path.realpath(out):
            return refuse(f"--out {args.out}: a resumed run continues in its own folder, --resume "
                          f"{out}; to train elsewhere, start a new run")
        if os.path.isfile(out):
            folder = os.path.dirname(out) or "."
            return refuse(f"--resume {out}: is a file; give the run's folder ({folder})")
        try:
            state, _, saved = trainer.load_checkpoint(os.path.join(out, trainer.CHECKPOINT))
        except (FileNotFoundError, OSError, ValueError) as e:
            return refuse(f"--resume {out}: {e}")
        done = int(state.epoch)
        cfg = Config(**saved)
        if "epochs" in given and given["epochs"] < done:
            return refuse(f"--epochs {given['epochs']}: the run in {out} has already trained "
                          f"{done} epoch{'s' * (done != 1)}; give at least {done} (more extends it)")
        try:
            cfg_given = dataclasses.replace(cfg, **given)
        except ValueError as e:
            return refuse(_name_flag(str(e)))
        conflicts = trainer.resume_conflicts(saved, cfg_given, done)
        if conflicts:
            flags = ", ".join(f"{_flag(k)} {v}" for k, (_, v) in conflicts.items())
            was = ", ".join(f"{k} {old}" for k, (old, _) in conflicts.items())
            return refuse(f"--resume {out}: {flags} contradict{'s' if len(conflicts) == 1 else ''} "
                          f"the checkpoint ({was}); a resumed run keeps its configuration, only "
                          "--epochs (to extend it) and --devices, --model-parallel may change; to train another "
                          "configuration start a new run with --out")
        cfg = cfg_given          # fit checks the dataset, then says what it resumes
    else:
        model_defaults = TRANSFORMER_DEFAULTS if given.get("model") == "transformer" else {}
        values = {k: given.get(k, model_defaults.get(k, getattr(Config, k))) for k in fields}
        if "input_noise" not in given:   # Config's noise suits the digits; the others get none
            values["input_noise"] = Config.input_noise if values["dataset"] == "digits" else 0.0
        try:   # Config refuses numbers that cannot train, naming the field
            cfg = Config(**values)
        except ValueError as e:
            return refuse(_name_flag(str(e)))
        name = os.path.splitext(os.path.basename(cfg.dataset))[0]
        out = args.out or os.path.join("runs", f"{cfg.model}-{name}")
        problem = _unusable_folder(out)
        if problem:
            return refuse(f"--out {out}: {problem}")
        old = trainer.existing_run(out)
        if old and not args.overwrite:
            default = "" if args.out else " (the default output folder)"
            return refuse(f"--out {out}{default} already holds a run ({os.path.basename(old)}); "
                          f"continue it with --resume {out}, or replace it with --overwrite")
    try:
        metrics = trainer.fit(cfg, out, resume=bool(args.resume), progress=not args.no_progress,
                              overwrite=args.overwrite)
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


def _name_flag(message: str) -> str:
    """``Config``'s message about a field (``seed must be …``) with the flag named first."""
    field = message.split(" ", 1)[0]
    if field in {f.name for f in dataclasses.fields(Config)}:
        return f"{_flag(field)}: {message}"
    return message


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

    # every field of Config is a flag (--batch-size for batch_size), its default Config's. The
    # parser's defaults are None, so that the flags the user gave are known: a resumed run
    # refuses those that contradict its checkpoint instead of ignoring them.
    t = sub.add_parser("train", help="train a model with the hand-written backwards (default: "
                                     "an MLP on scikit-learn's handwritten digits; needs "
                                     'pip install "jbackprop[cli]")')
    C = Config
    T = TRANSFORMER_DEFAULTS
    t.add_argument("--model", choices=["mlp", "resnet-s", "cnn", "transformer"],
                   help=f"default: {C.model}; the transformer's defaults differ: "
                        + ", ".join(f"{_flag(k)} {v}" for k, v in T.items()))
    t.add_argument("--dataset", help="digits | xor | housing | sort (sequences: the "
                   "transformer's) | PATH.npz (arrays x_train, y_train, "
                   "x_test, y_test; integer or bool y: classes, float y: regression); "
                   f"default: {C.dataset}")
    t.add_argument("--optimizer", choices=["sgd", "momentum", "adam"],
                   help=f"adam is AdamW (decoupled weight decay); default: {C.optimizer}")
    t.add_argument("--lr", type=float, help=f"peak learning rate (see --schedule); default: {C.lr}")
    t.add_argument("--schedule", choices=["cosine", "constant"],
                   help="learning rate: cosine decay from --lr to 0 over the run, or constant; "
                        f"default: {C.schedule}")
    t.add_argument("--batch-size", type=int, help=f"default: {C.batch_size}")
    t.add_argument("--epochs", type=int, help="with --resume: a larger number extends the run; "
                                              f"default: {C.epochs}")
    t.add_argument("--seed", type=int,
                   help="initialisation, batches and noise (a seed reproduces a run exactly), "
                        f"0 ≤ seed < 2**32; default: {C.seed}")
    t.add_argument("--backward", choices=["manual", "autodiff"],
                   help="manual: jbackprop's hand-written rules; autodiff: jax.grad of the "
                        f"pure-jnp reference of the same model; default: {C.backward}")
    t.add_argument("--width", type=int, help="hidden units (MLP, ResNet-S), d_model "
                   f"(transformer); default: {C.width}")
    t.add_argument("--depth", type=int, help=f"ResNet-S residual blocks, transformer blocks; "
                                             f"default: {C.depth}")
    t.add_argument("--heads", type=int, help=f"transformer attention heads; default: {C.heads}")
    t.add_argument("--weight-decay", type=float, help=f"default: {C.weight_decay}")
    t.add_argument("--input-noise", type=float,
                   help="std of Gaussian noise on training inputs (default "
                        f"{C.input_noise} for digits, else 0)")
    t.add_argument("--out", metavar="DIR", help="output folder (default runs/MODEL-DATASET)")
    t.add_argument("--overwrite", action="store_true",
                   help="start a new run even if --out holds one (its checkpoint is replaced "
                        "when the new run's first epoch is saved)")
    t.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR, with its saved "
                   "configuration: flags that contradict it are refused; --epochs may extend it "
                   "and --devices, --model-parallel may change")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--devices", type=int, default=None, metavar="N",
                   help=f"data parallel over N devices (default {C.devices}; --batch-size "
                        "must be a multiple of N; on CPU set "
                        "XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    t.add_argument("--model-parallel", type=int, default=None, metavar="M",
                   help=f"of the --devices, M split each MLP layer over its hidden units "
                        f"(a (N/M) × M data × model mesh; default {C.model_parallel}; "
                        "--model mlp only; M must divide N and --width)")
    t.set_defaults(run=_train)

    b = sub.add_parser("bench", help="time whole training steps with the hand-written backward "
                                     "against jax.grad of the same mathematics (a table and JSON)")
    b.add_argument("--config", nargs="+", metavar="NAME",
                   help="only these configurations (default: all): mlp-large, mlp-small, "
                        "resnet-s, layernorm-net, conv1d, conv2d, conv2d-pair, xent-10k, "
                        "transformer")
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
    b.add_argument("--no-forward", action="store_true",
                   help="skip the forward-mode section (JVPs and Hessian-vector products)")
    b.add_argument("--no-attention", action="store_true",
                   help="skip the attention section (memory and time against sequence length; "
                        "with --plot also its chart, PNG-attention.png)")
    b.add_argument("--no-fused-loss", action="store_true",
                   help="skip the fused MM + cross-entropy section (memory and time against "
                        "the unfused loss)")
    b.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

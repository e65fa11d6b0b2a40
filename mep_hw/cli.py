"""The ``mep-hw`` command line.

    mep-hw train --dataset {digits,mnist,fashion-mnist} [--layers 784,500,10] [--epochs N] … --out RUN_DIR

Every option of ``mep-hw train`` is a field of :class:`mep_hw.train.TrainConfig`; the parser is
built from those fields, so the CLI, ``config.toml`` and sweep files share one vocabulary.

Exit status: 0 done; 1 a sweep with points that did not complete; 2 an error a user can fix
(bad option or file, missing data, a read-only folder, a full disk), printed as one line saying
what to change; 3 a run that stopped because it diverged, stopped settling or a settle failed
(its status is in metrics.json, the last good epoch in checkpoint.pt); 130 interrupted, after
saving what it had. Warnings (e.g. many settles at their step limit) are one line each.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

from mep_hw.errors import ConfigError, DivergedError, MepHwError, SettleError, StorageError

__all__ = ["main", "build_parser"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mep_hw")
    except PackageNotFoundError:
        return "unknown"


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from mep_hw.train.config import TrainConfig

    for f in fields(TrainConfig):
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        shown = "" if default is None else f" (default: {default})"
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=meta["help"] + shown)
            continue
        if meta.get("cli") == "kv":
            p.add_argument(flag, action="append", default=None, metavar=meta["metavar"], help=meta["help"])
            continue
        kw = {"default": None, "help": meta["help"] + shown}
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        else:
            kw["metavar"] = meta.get("metavar")
            kw["type"] = _TYPES.get(f.name) or _type_of(f)
        p.add_argument(flag, **kw)


_INT = {"epochs", "batch_size", "max_steps", "nudged_max_steps", "lr_width", "seed", "limit_train", "limit_test", "eval_batch_size"}
_FLOAT = {"lr", "momentum", "weight_decay", "beta", "dt", "atol", "rtol", "nudged_atol", "nudged_rtol", "spectral_gamma", "omega", "omega_first"}
_TYPES = {**{n: int for n in _INT}, **{n: float for n in _FLOAT}}


def _type_of(f):
    """The argparse type of a config field from its annotation (``int``, ``float``, ``… | None``)."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    base = {part.strip() for part in t.split("|")} - {"None"}
    return int if base == {"int"} else float if base == {"float"} else str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mep-hw",
        description="Equilibrium Propagation training on modeled neuromorphic and analog hardware.",
    )
    parser.add_argument("--version", action="version", version=f"mep-hw {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    tp = sub.add_parser(
        "train",
        help="train a layered Hopfield network with EP",
        description=(
            "Train a layered Hopfield network with equilibrium propagation. Writes RUN_DIR/config.toml, "
            "RUN_DIR/checkpoint.pt (every epoch) and RUN_DIR/metrics.json."
        ),
    )
    tp.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to create (or continue with --resume)")
    tp.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last checkpoint")
    tp.add_argument("--config", metavar="TOML", help="read options from a config.toml (options given here override it)")
    tp.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    _add_train_options(tp)

    dp = sub.add_parser("devices", help="list, show or plot device cards", description="Device cards: the physical parameters of each modeled device, with their sources.")
    dsub = dp.add_subparsers(dest="devices_command", metavar="ACTION")
    dsub.required = True
    dsub.add_parser("list", help="list the shipped cards")
    show = dsub.add_parser("show", help="show every field of a card, with units and sources")
    show.add_argument("name", metavar="NAME_OR_PATH", help="a shipped card name or a path to a .toml card")
    show.add_argument("--set", action="append", default=None, metavar="FIELD=VALUE", help="override a field, as mep-hw train --set")
    plot = dsub.add_parser("plot", help="plot a crossbar card's conductance vs pulse number (potentiation, depression, spread)",
                           description="Draw the card's pulse response: conductance vs pulse number from g_min through a "
                           "potentiation ramp and a depression ramp, for a few devices of an array and the mean ± std over "
                           "many (cycle-to-cycle and device-to-device spread), with the measured points of a table card.")
    plot.add_argument("name", metavar="NAME_OR_PATH", help="a shipped crossbar card name or a path to a .toml card")
    plot.add_argument("--set", action="append", default=None, metavar="FIELD=VALUE", help="override a field, as mep-hw train --set")
    plot.add_argument("--out", default=None, metavar="PNG", help="output file (default: NAME_pulse_response.png)")
    plot.add_argument("--devices", type=int, default=1000, metavar="N", help="devices for the mean and spread (default 1000)")
    plot.add_argument("--seed", type=int, default=0)

    sp = sub.add_parser(
        "sweep", help="run a grid of training runs over device-card fields, bit-widths and seeds",
        description="Run every point of SWEEP.toml ([base] train options, [axes] lists, optional [zip]); one run folder per "
        "point, DIR/results.csv with one row per point. Completed points are skipped when the sweep is run again.",
    )
    sp.add_argument("spec", metavar="SWEEP.toml", help="the sweep file (see docs/sweeps.md)")
    sp.add_argument("--out", required=True, metavar="DIR", help="sweep folder (created; rerunning resumes it)")
    sp.add_argument("--workers", type=int, default=None, metavar="N", help="parallel points on the local process pool (default: one per core)")
    sp.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT", help="run the points on this Dask scheduler instead of the local pool")
    sp.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads per point (default: cores/workers locally, 1 on Dask)")
    sp.add_argument("--data-dir", default=None, metavar="DIR", help="folder with the IDX files, for every point "
                    "(else [base] data_dir, else $MEP_HW_DATA, else downloaded once into the cache)")
    sp.add_argument("--dry-run", action="store_true", help="validate the sweep, check its data and list its points without running them")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")

    cp = sub.add_parser(
        "compare", help="report hardware vs ideal runs and sweeps: Markdown and PNG plots",
        description="Read run folders and sweep folders and write REPORT_DIR/report.md with PNG plots: accuracy and loss "
        "curves, accuracy vs noise and bit-width, weights vs conductances, weights over training, settle steps, pulse counts.",
    )
    cp.add_argument("inputs", nargs="+", metavar="RUN_OR_SWEEP_DIR", help="run folders (metrics.json) or sweep folders (results.csv)")
    cp.add_argument("--out", required=True, metavar="REPORT_DIR", help="folder for report.md and the plots")
    cp.add_argument("--pdf", action="store_true", help="also write each plot as PDF")

    trp = sub.add_parser("trace", help="inspect an HDF5 training trace", description="Read the trace.h5 a run writes with --trace-every.")
    trsub = trp.add_subparsers(dest="trace_command", metavar="ACTION")
    trsub.required = True
    ins = trsub.add_parser("inspect", help="print a summary: run, intervals, datasets with shapes and units, last metrics")
    ins.add_argument("file", metavar="TRACE_H5", help="a trace.h5 file (or a run folder holding one)")
    return parser


def _out_folder(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise StorageError(f"--out {out} is a file, not a folder; give a folder path (it is created if missing)")
    return out


def _train(args: argparse.Namespace) -> int:
    from mep_hw.hw import parse_sets
    from mep_hw.io.runs import read_json, read_toml
    from mep_hw.train import TrainConfig, option_names, train
    from mep_hw.train.guards import plan_resume

    given = {n: getattr(args, n) for n in option_names() if getattr(args, n) is not None}
    if "set" in given:
        given["set"] = parse_sets(given["set"])
    out = _out_folder(args.out)
    if args.resume:
        if args.config:
            raise ConfigError(f"--config with --resume: a resumed run continues with its own {out / 'config.toml'}; drop --config")
        plan = plan_resume(out, given)  # continues exactly, or refuses with the reason
        cfg = plan.config
        m = read_json(out / "metrics.json") if (out / "metrics.json").exists() else {}
        if m.get("status") == "completed" and plan.start_epoch > cfg.epochs and not plan.changes:
            print(f"mep-hw: {out} is complete ({cfg.epochs} of {cfg.epochs} epochs); nothing to do. "
                  "Pass --epochs N to extend it", file=sys.stderr)
            return 0
    else:
        base = {}
        if args.config:
            base = read_toml(args.config)
            base = base.get("train", base) if isinstance(base.get("train"), dict) else base
        cfg = TrainConfig.from_dict({**base, **given}, source=args.config or "command line")
    result = train(cfg, out, resume=args.resume, explicit=set(given), progress=False if args.quiet else None)
    if not args.quiet:
        print(f"test accuracy {result.test_accuracy:.4f}; run folder {result.run_dir}")
        _print_cost(out)
    return 0


def _print_cost(run_dir: Path) -> None:
    from mep_hw.io.runs import read_json

    cost = read_json(run_dir / "metrics.json").get("cost")
    if not cost:
        return
    for phase in ("train", "inference"):
        c = cost[phase]
        e, lat = c["energy_J_per_sample"], c["latency_s_per_sample"]
        print(f"{phase}: {c['per_sample']['macs']:.3g} MACs, {c['per_sample']['pulses']:.3g} pulses per sample; "
              f"energy {'%.3g J' % e['total'] if e else 'n/a'}, settle latency {'%.3g s' % lat if lat is not None else 'n/a'} per sample")
    if cost["missing"]:
        print(f"cost: the card lacks {', '.join(cost['missing'])} (add them to its [cost] table or --set them)")


def _unit(name: str) -> str:
    for suffix, unit in (("_uS", "µS"), ("_s", "s"), ("_rad", "rad"), ("_dB", "dB"), ("_bits", "bits"), ("_J", "J"), ("_hz", "Hz")):
        if name.endswith(suffix):
            return unit
    return ""


#: fields whose value 0 is not a number of something but a mode
ZERO_MEANS = {
    "levels": "continuous conductance (no quantisation)",
    "dac_bits": "ideal DAC (no quantisation, no clipping)",
    "adc_bits": "ideal ADC (no quantisation, no clipping)",
    "phase_bits": "continuous phase shifters",
    "dw_min_uS": "pulse size range/1000",
}


def _devices(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from mep_hw.hw import list_cards, load_card, parse_sets

    if args.devices_command == "list":
        cards = list_cards()
        width = max(len(c.name) for c in cards)
        for c in cards:
            print(f"{c.name:<{width}}  {c.kind:<12}  {c.description}")
        return 0
    card = load_card(args.name, parse_sets(args.set) if args.set else None)
    if args.devices_command == "plot":
        from importlib import resources

        from mep_hw.hw.plots import plot_pulse_response

        if args.devices < 2:
            raise ConfigError(f"--devices {args.devices}: need at least 2 devices for a spread")
        csv = None
        table_file = getattr(card.device, "table_file", "")
        if table_file:
            here = Path(card.path).parent if Path(card.path).exists() else resources.files("mep_hw.cards")
            csv = (here / table_file).read_text()
        out = args.out or f"{card.name}_pulse_response.png"
        r = plot_pulse_response(card, out, n_devices=args.devices, seed=args.seed, measured_csv=csv)
        print(f"{card.name}: {r['n_up']} potentiating and {r['n_down']} depressing pulses, {r['n_devices']} devices -> {out}")
        return 0
    print(f"{card.name} ({card.kind}): {card.description}")
    print(f"source: {card.source}")
    for title, obj in (("device", card.device), ("periphery", card.periphery), ("cost", card.cost)):
        print(f"[{title}]")
        for f in fields(obj):
            if f.name == "name":
                continue
            v = getattr(obj, f.name)
            src = card.sources.get(f.name, "")
            unit = _unit(f.name)
            note = f"(0 = {ZERO_MEANS[f.name]}) " if f.name in ZERO_MEANS and v == 0 else ""
            print(f"  {f.name:<20} = {v!s:<24} {unit:<4} {note}{('— ' + src) if src else ''}".rstrip())
    zero = [n for n in ZERO_MEANS if any(n == f.name for obj in (card.device, card.periphery) for f in fields(obj))]
    if zero:
        print("0 means: " + "; ".join(f"{n} = 0: {ZERO_MEANS[n]}" for n in zero))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from mep_hw.errors import DataError
    from mep_hw.jobs.sweep import check_data, expand, load_sweep, run_sweep

    if args.dry_run:
        points = expand(load_sweep(args.spec, data_dir=args.data_dir))
        for p in points:
            print(f"{p.name}: " + ", ".join(f"{k}={v}" for k, v in p.values.items()))
        data = check_data(points)
        for a in data:
            where = "bundled with scikit-learn" if a.name == "digits" else (str(a.folder) if a.folder else a.problem)
            print(f"data: {a.name}: {where}")
        bad = [a for a in data if a.problem is not None and not a.download]
        if bad:
            raise DataError(f"{len(points)} points valid, but the data is missing: " + "; ".join(a.problem for a in bad))
        fetch = [a.name for a in data if a.download]
        print(f"{len(points)} points, all valid" + (f"; {', '.join(fetch)} will be downloaded once before the first point" if fetch else ""))
        return 0
    _out_folder(args.out)
    results = run_sweep(args.spec, args.out, workers=args.workers, scheduler=args.scheduler, threads=args.threads,
                        progress=False if args.quiet else None, data_dir=args.data_dir)
    counts: dict[str, int] = {}
    for r in results.values():
        counts[r.status] = counts.get(r.status, 0) + 1
    print(f"sweep {args.out}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; results in {Path(args.out) / 'results.csv'}")
    return 0 if all(r.status in ("completed", "skipped") for r in results.values()) else 1


def _compare(args: argparse.Namespace) -> int:
    from mep_hw.jobs.compare import compare

    report = compare([Path(p) for p in args.inputs], _out_folder(args.out), pdf=args.pdf)
    print(f"report: {report}")
    return 0


def _trace(args: argparse.Namespace) -> int:
    from mep_hw.io.trace import describe_trace

    path = Path(args.file)
    print(describe_trace(path / "trace.h5" if path.is_dir() else path))
    return 0


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    from mep_hw.train.guards import SettleWarning

    if issubclass(category, SettleWarning):
        print(f"mep-hw: warning: {message}", file=sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        return _train(args)
    if args.command == "devices":
        return _devices(args)
    if args.command == "trace":
        return _trace(args)
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "compare":
        return _compare(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    from mep_hw.io.runs import storage_error

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings
            return _run(args)
    except SettleError as e:
        print(f"mep-hw: settle failed: {e}", file=sys.stderr)
        return 3
    except DivergedError as e:
        print(f"mep-hw: run stopped: {e}", file=sys.stderr)
        return 3
    except MepHwError as e:
        print(f"mep-hw: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a filesystem failure not met where it happened (e.g. in matplotlib)
        print(f"mep-hw: error: {storage_error(e, e.filename or 'a file')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "sweep":
            print("mep-hw: interrupted; finished points are kept, run the same sweep again to continue", file=sys.stderr)
        else:
            print("mep-hw: interrupted; the last finished epoch is saved, continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``mep-hw`` command line.

    mep-hw train --dataset {digits,mnist,fashion-mnist} [--layers 784,500,10] [--epochs N] … --out RUN_DIR

Every option of ``mep-hw train`` is a field of :class:`mep_hw.train.TrainConfig`; the parser is
built from those fields, so the CLI, ``config.toml`` and sweep files share one vocabulary.
Errors a user can cause print one line saying what to change and exit with status 2;
an interrupted run exits with 130 after saving what it had.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from mep_hw.errors import MepHwError, SettleError

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
        kw = {"default": None, "help": meta["help"] + shown}
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        else:
            kw["metavar"] = meta.get("metavar")
            kw["type"] = _TYPES.get(f.name, str)
        p.add_argument(flag, **kw)


_INT = {"epochs", "batch_size", "max_steps", "nudged_max_steps", "seed", "limit_train", "limit_test", "eval_batch_size"}
_FLOAT = {"lr", "momentum", "weight_decay", "beta", "dt", "atol", "rtol", "nudged_atol", "nudged_rtol"}
_TYPES = {**{n: int for n in _INT}, **{n: float for n in _FLOAT}}


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
    return parser


def _train(args: argparse.Namespace) -> int:
    from mep_hw.io.runs import read_toml
    from mep_hw.train import TrainConfig, option_names, train

    given = {n: getattr(args, n) for n in option_names() if getattr(args, n) is not None}
    base = {}
    if args.config:
        base = read_toml(args.config)
        base = base.get("train", base) if isinstance(base.get("train"), dict) else base
    cfg = TrainConfig.from_dict({**base, **given}, source=args.config or "command line")
    result = train(cfg, Path(args.out), resume=args.resume, explicit=set(given), progress=False if args.quiet else None)
    if not args.quiet:
        print(f"test accuracy {result.test_accuracy:.4f}; run folder {result.run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
    except SettleError as e:
        print(f"mep-hw: settle failed: {e}", file=sys.stderr)
        return 3
    except MepHwError as e:
        print(f"mep-hw: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mep-hw: interrupted; the last finished epoch is saved, continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The conv benchmark with each weight matrix's learning rate given explicitly.

    python experiments/conv_lr_scales.py 1,0.08,0.122 --dataset fashion-mnist --data-dir DIR \\
        --arch conv:32:5,pool:2,conv:64:5,pool:2,fc:10 --cost ce --lr 0.03 --epochs 3 \\
        --limit-train 10000 --limit-test 2000 --out OUT.json

The first argument lists one multiplier of ``--lr`` per weight matrix, from the input up (the
kernels, then the fc matrices); the biases keep ``--lr``. Everything after it is passed to
``python -m mep_hw.benchmarks.conv``. The training code's own rule is
:func:`mep_hw.train.config.layer_lr_scales` on the network's state sizes (on the net above:
1, 125/4608, 125/1024); this script puts the given multipliers in its place for the run, and
:meth:`TrainConfig.param_groups` builds the groups from them as from the rule's. One group at
lr for every parameter needs no script: ``python -m mep_hw.benchmarks.conv … --set lr_width=0``.
Results: docs/conv.md, "Learning rates of a conv net";
``benchmarks/results/conv_fashion_probes_10k.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from mep_hw.benchmarks.conv import main as bench
from mep_hw.io.runs import write_json

# the module (``mep_hw.train.train`` the function shadows the attribute path)
config = importlib.import_module("mep_hw.train.config")


def given_scales(scales: list[float]):
    """A stand-in for :func:`layer_lr_scales` that returns ``scales`` (checked against the net)."""

    def layer_lr_scales(layers, cost, lr_width, *, conv=False) -> tuple[float, ...]:
        if len(scales) != len(layers) - 1:
            raise SystemExit(f"{len(scales)} multipliers given, the network has {len(layers) - 1} weight matrices")
        return tuple(scales)

    return layer_lr_scales


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        raise SystemExit(__doc__)
    scales = [float(v) for v in argv[0].split(",")]
    config.layer_lr_scales = given_scales(scales)
    rc = bench(argv[1:])
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", default="benchmarks/results/conv_mnist.json")  # the benchmark's default
    out = Path(parser.parse_known_args(argv[1:])[0].out)
    report = json.loads(out.read_text())
    report["lr_scales"] = scales  # the weight matrices' multipliers of lr
    write_json(out, report)
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""The conv benchmark with each weight matrix's learning rate given explicitly.

    python experiments/conv_lr_scales.py 1,0.08,0.122 --dataset fashion-mnist --data-dir DIR \\
        --arch conv:32:5,pool:2,conv:64:5,pool:2,fc:10 --cost ce --lr 0.03 --epochs 3 \\
        --limit-train 10000 --limit-test 2000 --out OUT.json

The first argument lists one multiplier of ``--lr`` per weight matrix, from the input up (the
kernels, then the fc matrices); the biases keep ``--lr``. ``one`` instead of a list puts every
parameter in one group at ``--lr``. Everything after it is passed to
``python -m mep_hw.benchmarks.conv``. The training code's own rule is
:func:`mep_hw.train.config.layer_lr_scales` on the network's state sizes (on the net above:
1, 125/4608, 125/1024); this script replaces :meth:`TrainConfig.param_groups` for the run to
measure other choices (docs/conv.md, "Learning rates of a conv net": results in
``benchmarks/results/conv_fashion_probes_10k.json``).
"""

from __future__ import annotations

import sys

from mep_hw.train.config import TrainConfig


def groups_with(scales: list[float] | None):
    """A ``param_groups`` that puts weight matrix l at lr·scales[l] and the biases at lr (None:
    one group at lr)."""

    def param_groups(self, model) -> list[dict]:
        if scales is None:
            return [{"params": list(model.param_list()), "lr": self.lr}]
        if len(scales) != len(model.weights):
            raise SystemExit(f"{len(scales)} multipliers given, the network has {len(model.weights)} weight matrices")
        return [{"params": [w], "lr": self.lr * k} for w, k in zip(model.weights, scales)] + [
            {"params": list(model.biases), "lr": self.lr}
        ]

    return param_groups


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        raise SystemExit(__doc__)
    scales = None if argv[0] == "one" else [float(v) for v in argv[0].split(",")]
    TrainConfig.param_groups = groups_with(scales)
    import argparse
    import json
    from pathlib import Path

    from mep_hw.benchmarks.conv import main as bench
    from mep_hw.io.runs import write_json

    rc = bench(argv[1:])
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", default="benchmarks/results/conv_mnist.json")  # the benchmark's default
    out = Path(parser.parse_known_args(argv[1:])[0].out)
    report = json.loads(out.read_text())
    report["lr_scales"] = "one group at lr" if scales is None else scales  # the weight matrices' multipliers of lr
    write_json(out, report)
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

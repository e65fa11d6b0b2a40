"""Energy and latency per sample of every device card on one task, from the cost accounting.

    python -m mep_hw.benchmarks.cost --data-dir ../shared/data --out benchmarks/results/cost_cards.json

The task: MNIST 784-500-10, symmetric EP (the ``mep-hw train`` defaults), one epoch on the first
2 000 training images, evaluation on 1 000 test images. The counts (MACs, conversions, pulses,
host FLOPs, neuron operations, settle time) are measured in the run; energies and latencies multiply them by each
card's ``[cost]`` constants (every one sourced in the card; see docs/cost.md).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mep_hw.io import load_dataset
from mep_hw.io.runs import read_json, write_json
from mep_hw.train import TrainConfig, train

CARDS = ["pcm", "reram_taox", "reram_agsi", "reram_agsi_measured", "ecram", "fefet", "mzi", "fpga_q16", "ideal"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cards", nargs="+", default=CARDS)
    p.add_argument("--limit-train", type=int, default=2000)
    p.add_argument("--limit-test", type=int, default=1000)
    p.add_argument("--out", default="benchmarks/results/cost_cards.json")
    a = p.parse_args(argv)
    ds = load_dataset("mnist", a.data_dir, limit_train=a.limit_train, limit_test=a.limit_test)
    report = {"benchmark": "cost_per_card", "task": f"MNIST 784-500-10, symmetric EP, 1 epoch on {a.limit_train} images, "
              f"test on {a.limit_test}", "cards": {}}
    for card in a.cards:
        cfg = TrainConfig(dataset="mnist", data_dir=a.data_dir, layers=(784, 500, 10), epochs=1, device=card,
                          limit_train=a.limit_train, limit_test=a.limit_test, estimator="symmetric")  # one estimator for every card, as measured
        with tempfile.TemporaryDirectory() as tmp:
            res = train(cfg, Path(tmp) / "run", dataset=ds, progress=False)
            cost = read_json(Path(tmp) / "run" / "metrics.json")["cost"]
        report["cards"][card] = {"test_accuracy": res.test_accuracy, **cost}
        tr, inf = cost["train"], cost["inference"]
        e = tr["energy_J_per_sample"]
        print(f"{card:<11} train: {e['total'] if e else float('nan'):.3e} J/sample, latency {tr['latency_s_per_sample'] or float('nan'):.3e} s; "
              f"inference {inf['energy_J_per_sample']['total'] if inf['energy_J_per_sample'] else float('nan'):.3e} J, "
              f"{inf['latency_s_per_sample'] or float('nan'):.3e} s; missing {cost['missing']}", flush=True)
        write_json(Path(a.out), report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

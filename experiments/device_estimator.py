"""One-sided vs symmetric EP through noisy device reads: the evidence for the device default.

    nice -n 10 python experiments/device_estimator.py --out benchmarks/results/device_estimator_digits.json

Small runs of :func:`mep_hw.train.train` (digits, 64-32-10, 400 images, 3 epochs, batch 50) on
device cards with noisy reads, each with ``--estimator symmetric`` and ``one-sided`` and
otherwise the defaults (Adam lr 1e-3, or Muon lr 0.02). Records train loss per epoch, test
accuracy and the mean settle steps. Writes one JSON file.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from mep_hw.io.runs import write_json
from mep_hw.train import TrainConfig, train

SMALL = dict(dataset="digits", layers=(64, 32, 10), epochs=3, batch_size=50, limit_train=400, limit_test=100)
SETUPS = (("reram_taox", "adam", 1e-3), ("pcm", "adam", 1e-3), ("reram_taox", "muon", 0.02))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    rows = []
    for dev, opt, lr in SETUPS:
        for est in ("symmetric", "one-sided"):
            cfg = TrainConfig(**SMALL, device=dev, optimizer=opt, lr=lr, estimator=est)
            with tempfile.TemporaryDirectory() as t:
                r = train(cfg, Path(t) / "r", progress=False)
            h = r.history
            rows.append({"device": dev, "optimizer": opt, "lr": lr, "estimator": est,
                         "test_accuracy": r.test_accuracy, "train_loss": [e.train_loss for e in h],
                         "free_steps_mean": [e.free_steps_mean for e in h],
                         "nudged_steps_mean": [e.nudged_steps_mean for e in h]})
            print(rows[-1], flush=True)
    write_json(Path(a.out), {"experiment": "device_estimator", "config": {k: list(v) if isinstance(v, tuple) else v
                                                                         for k, v in SMALL.items()},
                             "machine": {"platform": platform.platform(), "torch": torch.__version__}, "runs": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

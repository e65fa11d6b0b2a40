"""Accuracy of candidate EP defaults across depths and widths: the training loop of ``mep-hw train``.

    nice -n 10 python experiments/ep_defaults.py --data-dir /work/shared/data/mnist --limit-train 10000 \
        --epochs 1 --nets 784,500,10 784,500,500,10 --candidates old new \
        --out benchmarks/results/ep_defaults_10k.json

Each candidate is a set of TrainConfig fields (``CANDIDATES``; ``new`` is ``{}``: the current
defaults); each (net, candidate) pair is one run of :func:`mep_hw.train.train` with the same seed,
data and schedule. Records per epoch the test accuracy, the mean settle steps per sample of the
free and of each nudged phase, the share of samples at their step limit and the epoch time.
Writes one JSON file (rewritten after every run, so a stopped sweep keeps what it measured).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from mep_hw.io import load_dataset
from mep_hw.io.runs import write_json
from mep_hw.train import TrainConfig, train

# the defaults before issue 15 (symmetric β = 0.5, loose free phase), and the studied alternatives
CANDIDATES = {
    "new": {},
    "old": dict(estimator="symmetric", beta=0.5, atol=1e-4, rtol=1e-2, max_steps=100, nudged_max_steps=20,
                lr_width=0),
    "sym_b0.2": dict(estimator="symmetric", beta=0.2),
    "one_b0.5": dict(estimator="one-sided", beta=0.5),
    "one_b0.2": dict(estimator="one-sided", beta=0.2),
    "one_b1": dict(estimator="one-sided", beta=1.0),
    "sym_b0.5": dict(estimator="symmetric", beta=0.5),
    "new_lrw0": dict(lr_width=0),  # the new defaults with one learning rate for all layers
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--limit-test", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--nets", nargs="+", default=["784,500,10", "784,500,500,10", "784,500,500,500,10"])
    p.add_argument("--candidates", nargs="+", default=["old", "new"], choices=tuple(CANDIDATES))
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    ds = load_dataset(a.dataset, a.data_dir, limit_train=a.limit_train, limit_test=a.limit_test)
    rows = []
    report = {"experiment": "ep_defaults", "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                                        "threads": torch.get_num_threads()},
              "args": vars(a), "candidates": {k: CANDIDATES[k] for k in a.candidates}, "runs": rows}
    for net in a.nets:
        for name in a.candidates:
            cfg = TrainConfig(dataset=a.dataset, data_dir=a.data_dir, layers=net, epochs=a.epochs,
                              limit_train=a.limit_train, limit_test=a.limit_test, **CANDIDATES[name])
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                res = train(cfg, Path(tmp) / "run", dataset=ds, progress=False)
            h = res.history
            ep = cfg.ep_config()
            rows.append({
                "net": net, "candidate": name, "config": cfg.to_dict(),
                "free_tolerance": [ep.free.atol, ep.free.rtol, ep.free.max_steps],
                "nudged_tolerance": [ep.nudged.atol, ep.nudged.rtol, ep.nudged.max_steps],
                "test_accuracy": [e.test_accuracy for e in h], "train_accuracy": [e.train_accuracy for e in h],
                "free_steps_mean": [e.free_steps_mean for e in h], "nudged_steps_mean": [e.nudged_steps_mean for e in h],
                "free_step_limit_frac": [e.free_step_limit_frac for e in h],
                "nudged_step_limit_frac": [e.nudged_step_limit_frac for e in h],
                "epoch_seconds": [e.epoch_seconds for e in h], "seconds": time.perf_counter() - t0,
            })
            r = rows[-1]
            print(f"{net:22s} {name:10s} test acc {r['test_accuracy']} | steps free {r['free_steps_mean'][-1]:.1f} "
                  f"nudged {r['nudged_steps_mean'][-1]:.1f} (limit {r['nudged_step_limit_frac'][-1]:.2f}) | "
                  f"{sum(r['epoch_seconds']):.0f}s", flush=True)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            write_json(Path(a.out), report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""EP epoch time ÷ backprop epoch time, interleaved batch by batch in one process.

    nice -n 10 python -m mep_hw.benchmarks.epoch_ratio --data-dir ../shared/data/mnist \\
        --layers 784,500,10 --threads 1 2 --epochs 15 --out benchmarks/results/epoch_ratio_784-500-10.json

For each thread count, trains the EP run of :func:`mep_hw.train.train` (the defaults, or
``--solver``) and, after every EP step, one step of its backprop twin
(:class:`mep_hw.benchmarks.foundation.BackpropMLP`: same shape, hidden activation, cost,
optimizer, schedule and batches) inside the loop's ``on_batch`` callback. A slowdown of the
machine therefore hits both alike. The EP epoch time is the loop's training time minus the
backprop steps timed inside the callback; evaluation is not timed. Writes the per-epoch times,
their ratio (median over epochs), test accuracies, mean settle steps per phase and the load
average of the machine (``os.getloadavg``) before and after each measurement.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mep_hw.benchmarks.foundation import BackpropMLP
from mep_hw.io import load_dataset
from mep_hw.io.runs import write_json
from mep_hw.train import TrainConfig, train
from mep_hw.train.loop import epoch_generator, iterate_batches

__all__ = ["measure", "main"]


def measure(cfg: TrainConfig, ds, threads: int) -> dict:
    """Train EP and its backprop twin interleaved at ``threads`` threads; returns the figures."""
    torch.set_num_threads(threads)
    cfg = cfg.replace(layers=cfg.layers or (ds.input_dim, 500, ds.n_classes))
    xtr, ytr = torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train)
    xte, yte = torch.as_tensor(ds.x_test), torch.as_tensor(ds.y_test)
    n = xtr.shape[0]
    bp = BackpropMLP(cfg, cfg.epochs * -(-n // cfg.batch_size))
    bp_seconds: dict[int, float] = {}
    bp_acc: dict[int, float] = {}
    batches: dict[int, list] = {}

    def on_batch(epoch: int, b: int) -> None:
        if epoch not in batches:
            batches[epoch] = list(iterate_batches(n, cfg.batch_size, epoch_generator(cfg.seed, epoch)))
            bp_seconds[epoch] = 0.0
        t0 = time.perf_counter()
        bp.step(xtr, ytr, batches[epoch][b])
        bp_seconds[epoch] += time.perf_counter() - t0
        if b == len(batches[epoch]) - 1:
            bp_acc[epoch] = bp.accuracy(xte, yte)

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        res = train(cfg, Path(tmp) / "ep", dataset=ds, progress=False, on_batch=on_batch)
    load1 = os.getloadavg()
    ep_s = [h.epoch_seconds - bp_seconds[h.epoch] for h in res.history]
    bp_s = [bp_seconds[h.epoch] for h in res.history]
    ratios = [a / b for a, b in zip(ep_s, bp_s)]
    return {
        "threads": threads,
        "load_average_before": list(load0), "load_average_after": list(load1),
        "ep_epoch_seconds": ep_s, "backprop_epoch_seconds": bp_s,
        "ratio_per_epoch": ratios, "ratio_median": statistics.median(ratios),
        "ratio_total": sum(ep_s) / sum(bp_s),
        "ep_test_accuracy": [h.test_accuracy for h in res.history],
        "backprop_test_accuracy": [bp_acc[h.epoch] for h in res.history],
        "free_steps_mean": [h.free_steps_mean for h in res.history],
        "nudged_steps_mean": [h.nudged_steps_mean for h in res.history],
        "nudged_step_limit_frac": [h.nudged_step_limit_frac for h in res.history],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--layers", default="784,500,10")
    p.add_argument("--solver", default=None, help="settle solver (default: TrainConfig's)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/epoch_ratio.json", help="JSON file to write")
    a = p.parse_args(argv)
    kw = {"solver": a.solver} if a.solver else {}
    cfg = TrainConfig(dataset=a.dataset, data_dir=a.data_dir, layers=a.layers, epochs=a.epochs, batch_size=a.batch_size,
                      limit_train=a.limit_train, limit_test=a.limit_test, seed=a.seed, **kw)
    ds = load_dataset(cfg.dataset, cfg.data_dir, limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    runs = []
    for t in a.threads:
        r = measure(cfg, ds, t)
        runs.append(r)
        print(f"{t} thread(s): EP/backprop epoch {r['ratio_median']:.2f} (median; total {r['ratio_total']:.2f}); "
              f"EP test acc {r['ep_test_accuracy'][-1]:.4f}, backprop {r['backprop_test_accuracy'][-1]:.4f}; "
              f"load {r['load_average_before'][0]:.1f} → {r['load_average_after'][0]:.1f}", flush=True)
    write_json(Path(a.out), {
        "benchmark": "epoch_ratio", "config": cfg.to_dict(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "runs": runs,
    })
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

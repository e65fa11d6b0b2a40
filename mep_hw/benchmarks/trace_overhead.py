"""What tracing (``--trace-every``) adds to the training pass of an epoch.

    nice -n 10 python -m mep_hw.benchmarks.trace_overhead --data-dir ../shared/data/mnist \\
        --limit-train 10000 --epochs 1 --rounds 3 --out benchmarks/results/trace_overhead.json

Trains the same run (the defaults: 784-500-10, batch 100, seed 0) without a trace and with each
``--every`` value (default ``1epoch`` and ``10``: every 10 optimizer steps), in interleaved
rounds (every round trains every variant once, so a slowdown of the machine hits all alike).
The figure per variant is the median over rounds of (training-pass time of the traced run) ÷
(that of the untraced run of the same round) − 1; the training pass is ``EpochStats.epoch_seconds``
(what the loop's observers do per step is in it, the evaluation is not). On a loaded machine the
training pass itself drifts by tens of percent between runs, so the same runs also time the trace
observer's own work inside the pass (``TraceObserver.on_step``: accumulating the step sums, and
at each due interval the free-state energy, the weights and the HDF5 write) and report it as a
share of the rest of that run's pass (``in_run_share``) — the same overhead, measured on the same
run and so insensitive to the drift. The runs give the same weights whatever the trace (the trace
only reads), which is checked: the final test accuracies must agree.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mep_hw.errors import MepHwError
from mep_hw.io import load_dataset
from mep_hw.io.runs import write_json
from mep_hw.train import TrainConfig, train
from mep_hw.train.observers import TraceObserver

__all__ = ["measure", "main"]


@contextlib.contextmanager
def _timed_trace_steps():
    """Time every ``TraceObserver.on_step`` call made inside the block; yields a one-item list
    holding the seconds."""
    spent = [0.0]
    orig = TraceObserver.on_step

    def on_step(self, *args, **kw):
        t0 = time.perf_counter()
        try:
            return orig(self, *args, **kw)
        finally:
            spent[0] += time.perf_counter() - t0

    TraceObserver.on_step = on_step
    try:
        yield spent
    finally:
        TraceObserver.on_step = orig


def measure(cfg: TrainConfig, ds, *, every: list[str], rounds: int) -> dict:
    """Per-round training-pass seconds of the untraced run and of each traced variant."""
    variants = [None, *every]
    seconds: dict[str, list[float]] = {str(v): [] for v in variants}
    share: dict[str, list[float]] = {str(v): [] for v in variants}
    acc: dict[str, float] = {}
    for _ in range(rounds):
        for v in variants:
            with tempfile.TemporaryDirectory() as tmp, _timed_trace_steps() as spent:
                res = train(cfg.replace(trace_every=v), Path(tmp) / "run", dataset=ds, progress=False)
            total = sum(h.epoch_seconds for h in res.history)
            seconds[str(v)].append(total)
            share[str(v)].append(spent[0] / (total - spent[0]))
            acc[str(v)] = res.test_accuracy
    if len(set(acc.values())) != 1:
        raise MepHwError(f"tracing changed the run: final test accuracies {acc} differ (a trace must only read)")
    base = seconds["None"]
    out = {}
    for v in every:
        rel = [t / b - 1.0 for t, b in zip(seconds[v], base)]
        out[v] = {"overhead_median": statistics.median(rel), "overhead_per_round": rel, "seconds": seconds[v],
                  "in_run_share_median": statistics.median(share[v]), "in_run_share_per_round": share[v]}
    return {"untraced_seconds": base, "variants": out, "test_accuracy": acc["None"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--layers", default="784,500,10")
    p.add_argument("--solver", default=None, help="settle solver (default: TrainConfig's)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--every", nargs="+", default=["1epoch", "10"], help="--trace-every values to measure")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=1000)
    p.add_argument("--out", default="benchmarks/results/trace_overhead.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    kw = {"solver": a.solver} if a.solver else {}
    cfg = TrainConfig(dataset=a.dataset, data_dir=a.data_dir, layers=a.layers, epochs=a.epochs,
                      limit_train=a.limit_train, limit_test=a.limit_test, **kw)
    ds = load_dataset(cfg.dataset, cfg.data_dir, limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    load0 = os.getloadavg()
    r = measure(cfg, ds, every=a.every, rounds=a.rounds)
    write_json(Path(a.out), {
        "benchmark": "trace_overhead", "config": cfg.to_dict(), "threads": a.threads,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "load_average_before": list(load0), "load_average_after": list(os.getloadavg()), **r,
    })
    for v, f in r["variants"].items():
        print(f"--trace-every {v}: +{100 * f['overhead_median']:.1f} % of the training pass against untraced runs, "
              f"{100 * f['in_run_share_median']:.2f} % timed inside the run (medians of {a.rounds} rounds)")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

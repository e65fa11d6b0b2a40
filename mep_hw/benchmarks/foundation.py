"""Benchmark of the foundation: EP accuracy on MNIST, EP vs backprop epoch time, settle steps.

    python -m mep_hw.benchmarks.foundation --data-dir ../shared/data --out benchmarks/results/foundation.json

Trains the default EP run (784-500-10, hard sigmoid, MSE, symmetric EP, Adam with cosine
decay, batch 100) and, in the same process on the same batches, a plain PyTorch MLP of the same
shape and activation trained by backprop with the same optimizer. Writes one JSON file with the
final accuracies, the per-epoch times of both, their ratio (median over epochs) and the mean
settle steps per sample of the free and nudged phases.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from mep_hw.io import load_dataset
from mep_hw.io.runs import write_json
from mep_hw.train import TrainConfig, train
from mep_hw.benchmarks._baseline import baseline_optimizer
from mep_hw.train.fit import epoch_generator, iterate_batches


class _Clip01(nn.Module):
    def forward(self, x):
        return x.clamp(0.0, 1.0)


def backprop_baseline(cfg: TrainConfig, ds) -> dict:
    """The same network shape and hidden activation trained by backprop (linear output, the same
    MSE cost on one-hot targets, optimizer, schedule and batches); returns accuracy and times."""
    torch.manual_seed(cfg.seed)
    layers = cfg.layers
    mods: list[nn.Module] = []
    for n_in, n_out in zip(layers[:-2], layers[1:-1]):
        mods += [nn.Linear(n_in, n_out), _Clip01()]  # hidden layers: the hard sigmoid of the EP run
    net = nn.Sequential(*mods, nn.Linear(layers[-2], layers[-1]))  # linear output, MSE to one-hot
    xtr, ytr = torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train)
    xte, yte = torch.as_tensor(ds.x_test), torch.as_tensor(ds.y_test)
    n = xtr.shape[0]
    # the cheapest correct baseline: torch's fused Adam (the EP run's host Adam uses the same kernel)
    opt, sched = baseline_optimizer(cfg, net.parameters(), cfg.epochs * -(-n // cfg.batch_size))
    epochs = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        for idx in iterate_batches(n, cfg.batch_size, epoch_generator(cfg.seed, epoch)):
            x, y = xtr.index_select(0, idx), ytr.index_select(0, idx)
            target = nn.functional.one_hot(y, layers[-1]).to(x.dtype)
            opt.zero_grad(set_to_none=True)
            loss = 0.5 * ((net(x) - target) ** 2).sum(1).mean()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            acc = float((net(xte).argmax(1) == yte).float().mean())
        epochs.append({"epoch": epoch, "epoch_seconds": seconds, "test_accuracy": acc})
    return {"test_accuracy": epochs[-1]["test_accuracy"], "history": epochs}


def _median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def run(cfg: TrainConfig, out: Path, run_dir: Path | None = None) -> dict:
    ds = load_dataset(cfg.dataset, cfg.data_dir, limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    with tempfile.TemporaryDirectory() as tmp:
        res = train(cfg, run_dir or Path(tmp) / "ep", dataset=ds, progress=False)
    cfg = cfg.replace(layers=cfg.layers or (ds.input_dim, 500, ds.n_classes))
    bp = backprop_baseline(cfg, ds)
    ep_times = [h.epoch_seconds for h in res.history]
    bp_times = [h["epoch_seconds"] for h in bp["history"]]
    report = {
        "benchmark": "foundation",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "config": cfg.to_dict(),
        "ep": {
            "test_accuracy": res.test_accuracy,
            "best_test_accuracy": max(h.test_accuracy for h in res.history),
            "epoch_seconds": ep_times,
            "epoch_seconds_median": _median(ep_times),
            "free_steps_mean": [h.free_steps_mean for h in res.history],
            "nudged_steps_mean": [h.nudged_steps_mean for h in res.history],
            "free_steps_mean_all": sum(h.free_steps_mean for h in res.history) / len(res.history),
            "nudged_steps_mean_all": sum(h.nudged_steps_mean for h in res.history) / len(res.history),
            "nudged_step_limit_frac": [h.nudged_step_limit_frac for h in res.history],
            "test_accuracy_history": [h.test_accuracy for h in res.history],
        },
        "backprop": {
            "test_accuracy": bp["test_accuracy"],
            "epoch_seconds": bp_times,
            "epoch_seconds_median": _median(bp_times),
            "test_accuracy_history": [h["test_accuracy"] for h in bp["history"]],
        },
        "ep_over_backprop_epoch_time": _median(ep_times) / _median(bp_times),
        "ep_over_backprop_epoch_time_per_epoch": [a / b for a, b in zip(ep_times, bp_times)],
    }
    write_json(out, report)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--layers", default="784,500,10")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/foundation.json", help="JSON file to write")
    p.add_argument("--run-dir", default=None, help="keep the EP run folder here (default: a temporary folder)")
    a = p.parse_args(argv)
    cfg = TrainConfig(dataset=a.dataset, data_dir=a.data_dir, layers=a.layers, epochs=a.epochs,
                      limit_train=a.limit_train, limit_test=a.limit_test, seed=a.seed)
    r = run(cfg, Path(a.out), Path(a.run_dir) if a.run_dir else None)
    print(f"EP test accuracy {r['ep']['test_accuracy']:.4f} (backprop {r['backprop']['test_accuracy']:.4f}); "
          f"EP/backprop epoch time {r['ep_over_backprop_epoch_time']:.2f}; mean steps free "
          f"{r['ep']['free_steps_mean_all']:.2f} nudged {r['ep']['nudged_steps_mean_all']:.2f}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

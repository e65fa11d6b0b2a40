"""Benchmark of the settle solvers on a convolutional Hopfield network: the same EP run (same
initial weights, batches, optimizer and schedule) trained once per solver, interleaved epoch by
epoch in one process, and the EP gradient of each solver's settle against tightly settled
references on a fixed batch.

    python -m mep_hw.benchmarks.conv_solvers --dataset fashion-mnist --data-dir DIR \\
        --arch conv:16:5,pool:2,conv:32:5,pool:2,fc:10 --cost ce --lr 0.003 --epochs 3 \\
        --limit-train 10000 --limit-test 2000 --out benchmarks/results/conv_solvers_fashion.json

Each solver runs with the tolerances that ``TrainConfig`` resolves for it (``--solver`` given,
everything else default). Epoch e of every run is trained by ``mep_hw.train.train`` resumed from
epoch e − 1, so the per-epoch time ratio compares the solvers under the same machine load.
Gradient fidelity: after the last epoch, on the first 200 training images, the cosine between
the EP estimate of each solver (its training settles) and the estimates of phases settled to
1e-9 by each solver (5 000 steps) — with max pooling the energy has several fixed points, and
the two references may sit in different ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mep_hw.ep import EPConfig, ep_gradients
from mep_hw.io import load_dataset
from mep_hw.io.runs import write_json
from mep_hw.model import build_network, one_hot
from mep_hw.settle import SettleConfig
from mep_hw.train import TrainConfig, train
from mep_hw.benchmarks._baseline import config_sets

__all__ = ["gradient_fidelity", "run", "main"]


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.detach().flatten().double() for g in grads])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def gradient_fidelity(model, x, y, cfgs: dict[str, TrainConfig]) -> dict:
    """For each named config: its EP estimate (its own settles) vs references settled to 1e-9
    by each solver; with the mean steps of its phases and the seconds of the estimate."""
    refs = {}
    for name, cfg in cfgs.items():
        ep = cfg.ep_config()
        tight = SettleConfig(solver=ep.free.solver, dt=ep.free.dt, atol=1e-9, rtol=0.0, max_steps=5000)
        refs[ep.free.solver] = _flat(ep_gradients(model, x, y, EPConfig(beta=ep.beta, estimator=ep.estimator,
                                                                        free=tight, nudged=tight)).grads)
    out = {}
    for name, cfg in cfgs.items():
        ep = cfg.ep_config()
        t0 = time.perf_counter()
        r = ep_gradients(model, x, y, ep)
        seconds = time.perf_counter() - t0
        g = _flat(r.grads)
        out[name] = {
            "seconds": seconds,
            "free_steps_mean": float(r.free.steps.double().mean()),
            "nudged_steps_mean": [float(p.steps.double().mean()) for p in r.nudged],
            "nudged_step_limit_frac": [float((p.steps >= ep.nudged.max_steps).double().mean()) for p in r.nudged],
            **{f"cos_vs_{s}_reference": _cos(g, ref) for s, ref in refs.items()},
        }
    if len(refs) > 1:
        a, b = list(refs.values())[:2]
        out["references_cos"] = _cos(a, b)
    return out


def run(cfg: TrainConfig, solvers: list[str], out: Path) -> dict:
    ds = load_dataset(cfg.dataset, cfg.data_dir, limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    cfgs = {s: cfg.replace(solver=s) for s in solvers}
    plan = {s: (c.replace(cosine_cycles=(c.epochs,)) if c.schedule == "cosine" and c.cosine_cycles is None else c)
            for s, c in cfgs.items()}
    hist: dict[str, list] = {s: [] for s in solvers}
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for epoch in range(1, cfg.epochs + 1):
            for s in solvers:
                res = train(plan[s].replace(epochs=epoch), Path(tmp) / s, resume=epoch > 1, explicit={"epochs"},
                            dataset=ds, progress=False)
                hist[s] = list(res.history)
                h = hist[s][-1]
                print(f"epoch {epoch} {s}: test {h.test_accuracy:.4f} train {h.train_accuracy:.4f} "
                      f"({h.epoch_seconds:.1f}s, steps free {h.free_steps_mean:.1f} nudged {h.nudged_steps_mean:.1f})",
                      flush=True)
            report = _report(cfg, cfgs, hist)
            write_json(out, report)
        model = build_network(arch=cfg.arch, layers=None, input_shape=ds.input_shape, n_classes=ds.n_classes,
                              activation=cfg.activation, cost=cfg.cost, seed=cfg.seed, dtype=cfg.torch_dtype)
        model.load_state_dict(torch.load(Path(tmp) / solvers[-1] / "checkpoint.pt", weights_only=False)["model"])
        model.to(cfg.torch_device)
        x = torch.as_tensor(ds.x_train[:200]).to(cfg.torch_device, cfg.torch_dtype)
        y = one_hot(torch.as_tensor(ds.y_train[:200]), ds.n_classes).to(x)
        report["gradient_fidelity"] = {"model": f"after epoch {cfg.epochs} of the {solvers[-1]} run",
                                       **gradient_fidelity(model, x, y, cfgs)}
        write_json(out, report)
    return report


def _report(cfg: TrainConfig, cfgs: dict, hist: dict) -> dict:
    names = list(hist)
    base = names[0]
    runs = {}
    for s, hs in hist.items():
        ep = cfgs[s].ep_config()
        runs[s] = {
            "ep_config": {"free": dataclasses.asdict(ep.free), "nudged": dataclasses.asdict(ep.nudged)},
            "test_accuracy_history": [h.test_accuracy for h in hs],
            "train_accuracy_history": [h.train_accuracy for h in hs],
            "epoch_seconds": [h.epoch_seconds for h in hs],
            "free_steps_mean": [h.free_steps_mean for h in hs],
            "nudged_steps_mean": [h.nudged_steps_mean for h in hs],
        }
        if s != base:
            ratios = [a / b for a, b in zip(runs[s]["epoch_seconds"], runs[base]["epoch_seconds"])]
            runs[s][f"epoch_time_over_{base}"] = ratios
            runs[s][f"epoch_time_over_{base}_median"] = statistics.median(ratios)
    return {
        "benchmark": "conv_solvers",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "config": cfg.to_dict(),
        "solvers": names,
        "runs": runs,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mep_hw.benchmarks.conv_solvers", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    p.add_argument("--arch", default="conv:16:5,pool:2,conv:32:5,pool:2,fc:10")
    p.add_argument("--cost", default="ce", choices=("mse", "ce"))
    p.add_argument("--solvers", nargs="+", default=["euler", "block"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help="default: the training default (Adam on a conv net: 0.03)")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/conv_solvers.json", help="JSON file to write")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="other training-config fields, e.g. --set torch_device=cuda")
    a = p.parse_args(argv)
    cfg = TrainConfig.from_dict({"dataset": a.dataset, "data_dir": a.data_dir, "arch": a.arch, "cost": a.cost,
                                 "epochs": a.epochs, "lr": a.lr, "limit_train": a.limit_train,
                                 "limit_test": a.limit_test, "seed": a.seed, **config_sets(a.set)}, source="arguments")
    for s in a.solvers:
        cfg.replace(solver=s)  # a solver the net cannot run fails here, before any training
    run(cfg, a.solvers, Path(a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

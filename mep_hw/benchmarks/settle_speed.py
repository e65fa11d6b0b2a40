"""Settle time per training batch: solvers, the compaction threshold, and torch.compile.

    nice -n 10 python -m mep_hw.benchmarks.settle_speed --data-dir ../shared/data/mnist \\
        --layers 784,500,10 --out benchmarks/results/settle_speed_784-500-10.json

A network is trained for ``--warmup`` EP steps with the defaults (so its settles take the steps a
training run's take), then the free phase and the stacked ±β nudged phase of ``--batches``
further batches are stored and settled again by each variant, in interleaved rounds (every round
runs every variant once over all batches, so a slowdown of the machine hits all alike). A
variant is a solver (``euler``, ``block``) and a compaction threshold ``compact_work`` (the work
per step the finished rows must cost before they are taken out of the working batch; 0: at
once, inf: never). The figure is the median over rounds of the settle time per batch (free and
nudged phases), with the mean and maximum steps per phase.

``--compile`` times one eager Euler step of the 784-500-10 nudged phase against the same step
under ``torch.compile`` (dynamic shapes), at 200 and 20 rows.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch

from mep_hw.ep import assign_grads, ep_gradients
from mep_hw.io import load_dataset
from mep_hw.io.runs import write_json
from mep_hw.model import one_hot
from mep_hw.settle import settle
from mep_hw.train import TrainConfig
from mep_hw.train.loop import build_model, epoch_generator, iterate_batches

__all__ = ["measure", "compile_step", "main"]

THRESHOLDS = (0.0, 5e5, 2e6, 8e6, math.inf)


def _problems(cfg: TrainConfig, ds, warmup: int, batches: int):
    model = build_model(cfg, ds.input_dim, ds.n_classes)
    params = model.param_list()
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=True)
    xtr, ytr = torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train)
    idx = iterate_batches(xtr.shape[0], cfg.batch_size, epoch_generator(cfg.seed, 1))
    ep = cfg.ep_config()
    n_out = ds.n_classes
    for i in idx[:warmup]:
        x = xtr.index_select(0, i)
        res = ep_gradients(model, x, one_hot(ytr.index_select(0, i), n_out, x.dtype), ep)
        assign_grads(params, res.grads)
        opt.step()
    probs = []
    for i in idx[warmup : warmup + batches]:
        x = xtr.index_select(0, i)
        y = one_hot(ytr.index_select(0, i), n_out, x.dtype)
        dyn = model.dynamics(x)
        init = model.forward_init(dyn)
        free = settle(dyn, init, ep.free, throw=False)
        B = x.shape[0]
        col = torch.cat([x.new_full((B, 1), ep.beta), x.new_full((B, 1), -ep.beta)])
        probs.append((dyn, init, dyn.nudge(col, torch.cat([y, y])), [torch.cat([s, s]) for s in free.states]))
    return probs, ep


def measure(cfg: TrainConfig, ds, *, warmup: int, batches: int, rounds: int, solvers, thresholds) -> dict:
    probs, ep = _problems(cfg, ds, warmup, batches)
    variants = [(s, c) for s in solvers for c in thresholds]
    times = {v: [] for v in variants}
    steps = {}
    for _ in range(rounds):
        for solver, cw in variants:
            free_cfg, nudged_cfg = ep.free.with_solver(solver), ep.nudged.with_solver(solver)
            t0 = time.perf_counter()
            out = [(settle(d, i, free_cfg, throw=False, compact_work=cw), settle(nd, ni, nudged_cfg, throw=False, compact_work=cw))
                   for d, i, nd, ni in probs]
            times[(solver, cw)].append((time.perf_counter() - t0) / len(probs))
            if solver not in steps:
                f = torch.cat([a.steps for a, _ in out]).double()
                n = torch.cat([b.steps for _, b in out]).double()
                steps[solver] = {"free_mean": float(f.mean()), "nudged_mean": float(n.mean()),
                                 "free_max_per_batch": statistics.mean(int(a.steps.max()) for a, _ in out),
                                 "nudged_max_per_batch": statistics.mean(int(b.steps.max()) for _, b in out)}
    rows = [{"solver": s, "compact_work": c if math.isfinite(c) else "inf", "ms_per_batch": 1e3 * statistics.median(t)}
            for (s, c), t in times.items()]
    return {"layers": list(cfg.layers), "warmup_batches": warmup, "batches": batches, "rounds": rounds,
            "threads": torch.get_num_threads(), "rows": rows, "steps": steps}


def compile_step(reps: int = 5, n: int = 30) -> dict:
    """Eager vs torch.compile of one Euler step (field, steady-state test, masked update) of the
    784-500-10 MSE network in its nudged phase."""
    g = torch.Generator().manual_seed(0)
    W1 = torch.rand(10, 500, generator=g) * 0.05
    b1 = torch.rand(10, generator=g)

    def step(s, drive0, a, c, mask, atol: float):
        s0, s1 = s[:, :500], s[:, 500:]
        d0 = torch.addmm(drive0, s1, W1)
        d1 = torch.addcmul(c, torch.addmm(b1, s0, W1.T), a)
        k = torch.cat([d0, d1], 1).clamp_(0, 1).sub_(s)
        rn = torch.linalg.vector_norm(k, dim=1)
        return s.addcmul(k, mask), rn > atol

    compiled = torch.compile(step, dynamic=True)

    def run(f, B):
        s = torch.rand(B, 510, generator=g)
        args = (torch.rand(B, 500, generator=g), torch.full((B, 1), 2.0), torch.rand(B, 10, generator=g), torch.ones(B, 1))
        r = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(n):
                s, _ = f(s, *args, 1e-5)
            r.append((time.perf_counter() - t0) / n)
        return 1e6 * statistics.median(r)

    t0 = time.perf_counter()
    run(compiled, 200), run(compiled, 20)
    out = {"compile_seconds": time.perf_counter() - t0}
    for B in (200, 20):
        e1, c1, e2, c2 = run(step, B), run(compiled, B), run(step, B), run(compiled, B)
        out[f"rows_{B}"] = {"eager_us": min(e1, e2), "compiled_us": min(c1, c2)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--layers", default="784,500,10")
    p.add_argument("--warmup", type=int, default=300, help="EP training steps before the settles are stored")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--solvers", nargs="+", default=["euler", "block"])
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    p.add_argument("--compile", action="store_true", help="also time torch.compile of one Euler step")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/settle_speed.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = TrainConfig(dataset=a.dataset, data_dir=a.data_dir, layers=a.layers)
    ds = load_dataset(cfg.dataset, cfg.data_dir, limit_train=a.limit_train, limit_test=1)
    load0 = os.getloadavg()
    r = measure(cfg, ds, warmup=a.warmup, batches=a.batches, rounds=a.rounds, solvers=a.solvers, thresholds=a.thresholds)
    if a.compile:
        r["compile"] = compile_step()
    r["load_average_before"], r["load_average_after"] = list(load0), list(os.getloadavg())
    write_json(Path(a.out), {"benchmark": "settle_speed", "torch": torch.__version__, **r})
    for row in r["rows"]:
        print(f"{row['solver']:6s} compact_work {row['compact_work']!s:>8}: {row['ms_per_batch']:.2f} ms per batch")
    print(f"steps {r['steps']}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

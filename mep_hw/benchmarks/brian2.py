"""Benchmark of the Brian2 settle backend against the torch engine: agreement, time, accuracy.

    python -m mep_hw.benchmarks.brian2 --out benchmarks/results/brian2.json

``settle``: for each network (64-32-10 at batch 50, 784-500-10 at batch 20 and 100, and
784-500-500-10 at batch 20; ``--networks`` picks), on the same random weights (the default init,
seed 0) and inputs (uniform in [0, 1]), a free settle from the forward pass with the torch
engine (``euler``), the Brian2 backend (``brian2``, numpy code) and, unless ``--no-cython``,
``brian2_cython``, timed in interleaved rounds (median seconds per settle, and ratios). Settings:
the training defaults of ``mep-hw train`` (dt = 1, atol = 1e-4, rtol = 1e-2, max_steps = 100),
where a free settle from the forward pass takes a few steps, and exactly 100 and 1 steps
(min_steps = max_steps), whose difference separates the cost per step from the cost per call
(building the network, code generation). Agreement: max |s_brian2 − s_torch| (float32, as in
training) for each setting, and in float64 at a tight tolerance (atol 1e-8).

``accuracy``: the short digits EP run of the tests (64-32-10, 3 epochs, batch 20, Adam lr 0.003,
300 training and 200 test images) with both solvers for seeds 0–4: test accuracy and wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mep_hw.io.runs import write_json
from mep_hw.model import LayeredHopfield
from mep_hw.settle import SettleConfig, settle
from mep_hw.train import TrainConfig, train

NETWORKS = {
    "64-32-10@50": ((64, 32, 10), 50),
    "784-500-10@20": ((784, 500, 10), 20),
    "784-500-10@100": ((784, 500, 10), 100),
    "784-500-500-10@20": ((784, 500, 500, 10), 20),
}
TRAIN_DEFAULTS = dict(dt=1.0, atol=1e-4, rtol=1e-2, max_steps=100)
FIXED_STEPS = dict(dt=1.0, atol=1e-4, rtol=1e-2)  # with min_steps = max_steps: every sample takes them all


def _problem(layers, batch, dtype=torch.float32):
    model = LayeredHopfield(layers, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x = torch.rand(batch, layers[0], generator=torch.Generator().manual_seed(1), dtype=dtype)
    dyn = model.dynamics(x)
    return dyn, model.forward_init(dyn)


def _maxdiff(a, b) -> float:
    return float(max((u.double() - v.double()).abs().max() for u, v in zip(a.states, b.states)))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def settle_bench(name: str, rounds: int, solvers=("euler", "brian2", "brian2_cython")) -> dict:
    layers, batch = NETWORKS[name]
    dyn, init = _problem(layers, batch)
    cases = {
        "train_defaults": SettleConfig(solver="euler", **TRAIN_DEFAULTS),
        "fixed_100_steps": SettleConfig(solver="euler", max_steps=100, min_steps=100, **FIXED_STEPS),
        "fixed_1_step": SettleConfig(solver="euler", max_steps=1, min_steps=1, **FIXED_STEPS),
    }
    out: dict = {"layers": list(layers), "batch": batch,
                 "synapses": batch * sum(a * b for a, b in zip(layers[1:-1], layers[2:]))}
    for case, cfg in cases.items():
        runs = {s: (lambda c=dataclasses.replace(cfg, solver=s): settle(dyn, init, c, throw=False)) for s in solvers}
        for run in runs.values():  # warm up: the first Brian2 call imports brian2, fills caches, compiles (cython)
            run()
        times: dict = {s: [] for s in solvers}
        res = {}
        for _ in range(rounds):  # interleaved, so that background load hits all alike
            for s, run in runs.items():
                t, res[s] = _timed(run)
                times[s].append(t)
        ref = res["euler"]
        out[case] = {
            "seconds_median": {s: statistics.median(t) for s, t in times.items()},
            "seconds_min": {s: min(t) for s, t in times.items()},
            "ratio_over_torch": {s: statistics.median(times[s]) / statistics.median(times["euler"])
                                 for s in solvers if s != "euler"},
            "steps_mean": {s: float(r.steps.float().mean()) for s, r in res.items()},
            "steps_max": {s: int(r.steps.max()) for s, r in res.items()},
            "nfev": {s: r.nfev for s, r in res.items()},
            "converged": {s: r.converged for s, r in res.items()},
            "max_abs_diff_states_vs_torch": {s: _maxdiff(r, ref) for s, r in res.items() if s != "euler"},
        }
    fixed, one = out["fixed_100_steps"]["seconds_median"], out["fixed_1_step"]["seconds_median"]
    out["per_step_ms"] = {s: 1e3 * (fixed[s] - one[s]) / 99 for s in solvers}
    # max_steps = 1 runs two Brian2 time steps (the second one's update is discarded)
    out["per_call_overhead_s"] = {s: one[s] - 2 * out["per_step_ms"][s] / 1e3 for s in solvers if s != "euler"}
    # float64 agreement at a tight tolerance
    dyn64, init64 = _problem(layers, batch, torch.float64)
    tight = SettleConfig(solver="euler", dt=1.0, atol=1e-8, rtol=0.0, max_steps=2000)
    rt = settle(dyn64, init64, tight, throw=False)
    rb = settle(dyn64, init64, dataclasses.replace(tight, solver="brian2"), throw=False)
    out["float64_tight"] = {"atol": 1e-8, "rtol": 0.0, "max_abs_diff_states": _maxdiff(rb, rt),
                            "steps_equal": bool(torch.equal(rb.steps, rt.steps)),
                            "steps_mean": float(rt.steps.float().mean()),
                            "converged": {"torch": rt.converged, "brian2": rb.converged}}
    return out


def accuracy_bench(seeds) -> dict:
    base = dict(dataset="digits", layers=(64, 32, 10), epochs=3, batch_size=20, lr=0.003, limit_train=300,
                limit_test=200)
    runs = {}
    for seed in seeds:
        for solver in ("euler", "brian2"):
            with tempfile.TemporaryDirectory() as tmp:
                wall, res = _timed(lambda: train(TrainConfig(solver=solver, seed=seed, **base), Path(tmp) / "run",
                                                 progress=False))
            runs.setdefault(str(seed), {})[solver] = {
                "test_accuracy": res.test_accuracy, "wall_s": wall,
                "test_accuracy_history": [h.test_accuracy for h in res.history],
                "free_steps_mean": [h.free_steps_mean for h in res.history],
                "nudged_steps_mean": [h.nudged_steps_mean for h in res.history],
            }
            print(f"digits seed {seed} {solver}: test accuracy {res.test_accuracy:.3f} ({wall:.1f} s)", flush=True)
    diffs = [abs(r["brian2"]["test_accuracy"] - r["euler"]["test_accuracy"]) for r in runs.values()]
    accs = {s: [r[s]["test_accuracy"] for r in runs.values()] for s in ("euler", "brian2")}
    return {
        "config": {**base, "layers": list(base["layers"])}, "runs": runs,
        "max_abs_diff_accuracy_same_seed": max(diffs),
        "accuracy_mean": {s: float(np.mean(a)) for s, a in accs.items()},
        "accuracy_std_over_seeds": {s: float(np.std(a)) for s, a in accs.items()},
        "wall_s_median": {s: float(np.median([r[s]["wall_s"] for r in runs.values()])) for s in ("euler", "brian2")},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/brian2.json")
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4], help="digits EP runs (none: skip)")
    p.add_argument("--no-cython", dest="cython", action="store_false", help="skip brian2_cython (needs a C compiler)")
    args = p.parse_args(argv)
    import brian2

    report: dict = {
        "benchmark": "brian2_backend",
        "environment": {
            "brian2": brian2.__version__, "numpy": np.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "codegen_targets": {"brian2": "numpy", "brian2_cython": "cython"},
            "load_average_at_start": list(os.getloadavg()),
            "note": "2-core machine shared with other jobs: times are medians of interleaved rounds",
        },
        "settle": {},
    }
    solvers = ("euler", "brian2") + (("brian2_cython",) if args.cython else ())
    for name in args.networks:
        report["settle"][name] = r = settle_bench(name, args.rounds, solvers)
        write_json(args.out, report)
        d = r["train_defaults"]
        print(f"{name}: free settle at the training tolerance: " + ", ".join(
            f"{s} {1e3 * d['seconds_median'][s]:.1f} ms" for s in solvers) +
            f"; {d['steps_mean']['brian2']:.1f} steps, max |Δs| {d['max_abs_diff_states_vs_torch']['brian2']:.1e}; "
            "per step " + ", ".join(f"{s} {r['per_step_ms'][s]:.2f} ms" for s in solvers), flush=True)
    if args.seeds:
        report["accuracy"] = accuracy_bench(args.seeds)
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The two settles of EP on an ``nn.Sequential`` compared: the backprop-equivalent Newton flow
and the local flow (with per-layer time constants — the default — or plain, with adaptive
solvers, larger steps and limits, with the reflected −β start).

    python -m mep_hw.benchmarks.settle_flows --data-dir ../shared/data/mnist --out benchmarks/results/settle_flows.json

For the MNIST MLP and CNN of the benchmark runner (``mnist_mlp``, ``mnist_cnn``) the weights are
taken at initialisation and after ``--train-steps`` smep steps (batch 128, Newton settle), and
one batch is settled by every variant, in interleaved rounds (each round runs every variant
once, so a slowdown of the machine hits all alike; the time is the median over rounds). Per
variant: converged fraction, steps per sample and phase (mean, max), field evaluations, time
per EP estimate, and the estimate's cosine with and norm relative to backprop's gradient of
the same loss. A third part settles a 20-16-12-5 Tanh MLP (random data, weights × 1 and × 2.5)
in float64. The accuracy comparison is the runner's (``--baselines smep local_ep``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from mep_hw.benchmarks.runner import _tensors, build_model, load_config
from mep_hw.ep import EPConfig, ep_gradients
from mep_hw.errors import MepHwError
from mep_hw.io.runs import read_json, write_json
from mep_hw.model import FeedforwardEnergy
from mep_hw.optimizers import smep
from mep_hw.optimizers.strategies import reflected_symmetric
from mep_hw.settle import SettleConfig

__all__ = ["VARIANTS", "run", "main"]

BETA = 0.1
TOL = 1e-5  # EPGradient's default settle_tol
# name: (flow, time constants, solver, dt, step limit, reflected −β start); "plain": τ_l = 1
VARIANTS = {
    "newton (default)": ("newton", True, "euler", 1.0, 20, False),
    "local, limit 100": ("local", True, "euler", 1.0, 100, False),
    "local, reflected": ("local", True, "euler", 1.0, 100, True),
    "local (default: limit 300)": ("local", True, "euler", 1.0, 300, False),
    "local, dt 1.5": ("local", True, "euler", 1.5, 100, False),
    "local, bosh3": ("local", True, "bosh3", 1.0, 100, False),
    "local, dopri5": ("local", True, "dopri5", 1.0, 100, False),
    "local, plain, dt 0.5": ("local", False, "euler", 0.5, 1000, False),
    "local, plain, dt 0.2": ("local", False, "euler", 0.2, 1000, False),
    "local, plain, dt 0.1": ("local", False, "euler", 0.1, 1000, False),
}


def _estimate(model, x, y, variant):
    flow, tau, solver, dt, limit, reflect = variant
    energy = FeedforwardEnergy(model, "cross_entropy", settle=flow, time_constants=tau)
    nudged = SettleConfig(solver=solver, dt=dt, atol=TOL, rtol=0.0, max_steps=limit, err_atol=TOL / 10, err_rtol=0.0, dt_max=4.0)
    cfg = EPConfig(beta=BETA, estimator="symmetric", init="forward", free=dataclasses.replace(nudged, max_steps=1), nudged=nudged)
    _, free = energy.forward_states(x)
    if reflect:
        return reflected_symmetric(energy, x, y, cfg, free, energy.ep_contrast)
    return ep_gradients(energy, x, y, cfg, free_states=free)


def _flat(gs):
    return torch.cat([g.flatten() for g in gs]).double()


def compare(model, x, y, rounds: int, variants=VARIANTS, log=print) -> dict:
    """Every variant on one batch, ``rounds`` interleaved rounds; see the module docstring."""
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    bp = _flat([p.grad for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    out: dict[str, dict] = {}
    for _ in range(rounds):
        for name, v in variants.items():
            if out.get(name, {}).get("status") == "diverged":
                continue
            t0 = time.perf_counter()
            try:
                res = _estimate(model, x, y, v)
            except MepHwError as e:  # a non-finite settle raises: record it
                out[name] = {"status": "diverged", "error": str(e).split(";")[0]}
                continue
            times[name].append(time.perf_counter() - t0)
            if name in out:
                continue
            steps = torch.stack([r.steps for r in res.nudged]).float()
            g = _flat(res.grads)
            out[name] = {
                "status": "ok",
                "converged_frac": float(sum(int((r.status == 0).sum()) for r in res.nudged)) / steps.numel(),
                "steps_mean_plus": float(steps[0].mean()), "steps_mean_minus": float(steps[1].mean()),
                "steps_max": int(steps.max()), "nfev": int(sum(r.nfev for r in res.nudged)),
                "cos_backprop": float(g @ bp / (g.norm() * bp.norm())), "norm_ratio": float(g.norm() / bp.norm()),
            }
    for name, r in out.items():
        if r["status"] == "ok":
            r["ms_median"] = 1e3 * statistics.median(times[name])
            log(f"    {name:28s} conv {r['converged_frac']:.2f} steps +{r['steps_mean_plus']:6.1f} -{r['steps_mean_minus']:6.1f} "
                f"max {r['steps_max']:5d} nfev {r['nfev']:5d} {r['ms_median']:8.1f} ms cos {r['cos_backprop']:.5f} "
                f"|g|/|bp| {r['norm_ratio']:.3f}")
        else:
            log(f"    {name:28s} {r['error']}")
    return out


def _trained(cfg, xtr, ytr, model0, steps: int):
    m = copy.deepcopy(model0)
    opt = smep(m.parameters(), model=m)
    perm = torch.randperm(xtr.shape[0], generator=torch.Generator().manual_seed(cfg.seed + 1))
    for idx in perm.split(cfg.batch_size)[:steps]:
        opt.zero_grad(set_to_none=True)
        m(xtr[idx])
        opt.step(target=ytr[idx])
    return m


def _sigmas(model):
    return [float(torch.linalg.matrix_norm(p.detach().reshape(p.shape[0], -1).double(), 2)) for p in model.parameters() if p.ndim >= 2]


def toy(rounds: int, variants=VARIANTS, log=print) -> dict:
    """The 20-16-12-5 Tanh MLP of the issue, float64, 64 random samples, weights × 1 and × 2.5."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 20, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (64,), generator=g)
    out = {}
    for scale in (1.0, 2.5):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5)).double()
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(scale)
        log(f"  20-16-12-5 tanh, weights x {scale}: sigma(W) = {[round(s, 2) for s in _sigmas(m)]}")
        out[f"x{scale}"] = {"sigma": _sigmas(m), "variants": compare(m, x, y, rounds, variants, log=log)}
    return out


def run(data_dir, out: Path, batch: int = 128, rounds: int = 3, train_steps: int = 100, configs=("mnist_mlp", "mnist_cnn", "toy"),
        variants=tuple(VARIANTS), log=print) -> dict:
    """Measure ``configs``; results are merged into ``out`` if it exists (one file for runs of
    different configs)."""
    torch.manual_seed(0)
    chosen = {k: VARIANTS[k] for k in variants}
    report = read_json(out) if out.exists() else {"results": {}}
    report.update({"beta": BETA, "tol": TOL, "batch": batch, "train_steps": train_steps,
                   "variants": {k: dict(zip(("flow", "time_constants", "solver", "dt", "max_steps", "reflected"), v)) for k, v in VARIANTS.items()},
                   "torch": torch.__version__, "threads": torch.get_num_threads()})
    for name in configs:
        report.setdefault("rounds", {})[name] = rounds
        if name == "toy":
            report["results"]["tanh_20_16_12_5"] = toy(rounds, chosen, log)
            write_json(out, report)
            continue
        cfg = dataclasses.replace(load_config(name), limit_test=1)
        xtr, ytr, _, _, shape = _tensors(cfg, data_dir)
        model0 = build_model(cfg.model, (1, *shape), cfg.seed)
        x, y = xtr[-batch:], ytr[-batch:]  # not among the training steps' batches unless the set is small
        report["results"][name] = {}
        for snap, model in (("init", model0), (f"after {train_steps} smep steps", _trained(cfg, xtr[:-batch], ytr[:-batch], model0, train_steps))):
            log(f"  {name}, {snap}: sigma(W) = {[round(s, 2) for s in _sigmas(model)]}")
            report["results"][name][snap] = {"sigma": _sigmas(model), "variants": compare(model, x, y, rounds, chosen, log=log)}
            write_json(out, report)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mep_hw.benchmarks.settle_flows", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
    p.add_argument("--out", default="benchmarks/results/settle_flows.json")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=100, help="smep steps before the second snapshot")
    p.add_argument("--configs", nargs="+", default=["mnist_mlp", "mnist_cnn", "toy"], choices=["mnist_mlp", "mnist_cnn", "toy"],
                   help="runner configs to measure; toy: the 20-16-12-5 Tanh MLP")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                   help=f"settle variants (default: all): {'; '.join(VARIANTS)}")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    run(a.data_dir, Path(a.out), a.batch, a.rounds, a.train_steps, a.configs, a.variants)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

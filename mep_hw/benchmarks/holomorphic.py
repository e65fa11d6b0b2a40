"""Benchmark: holomorphic vs symmetric EP — gradient error against the implicit gradient, per
settle cost, on the two-hidden-layer network.

    python -m mep_hw.benchmarks.holomorphic --data-dir ../shared/data/mnist --layers 784,500,500,10 \\
        --out benchmarks/results/holomorphic.json

A batch of MNIST images (digits without --data-dir), the layered Hopfield network with the
sigmoid ρ(s) = σ(4s − 2) (the holomorphic activation), float64/complex128. The reference is the
gradient of L = mean_b C(s*_b) by implicit differentiation through the free fixed point:
dL/dθ = ∂C/∂θ − λᵀ∂²E/∂s∂θ with (∂²E/∂s²) λ = ∂C/∂s, solved by conjugate gradients on
Hessian-vector products (autograd) to a relative residual of 1e-12. Estimators: symmetric
(= holomorphic N = 2) and holomorphic N = 3, 4, 6, at several |β|, with the nudged phases
(i) settled to convergence (the estimator's own bias) and (ii) given a fixed budget of T Euler
steps (dt = 0.5) per phase. Cost is counted in real-equivalent field evaluations per sample:
each settled phase's steps, a complex phase counting twice (its real and imaginary parts are two
real reads of the weights); the N-point estimator settles ⌈N/2⌉ phases (the conjugates are
implied), i.e. N real-equivalent phases. Writes the relative error ‖ĝ − g‖/‖g‖ and the cosine
similarity of every (estimator, |β|, budget) to JSON.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from mep_hw.ep import EPConfig, ep_gradients
from mep_hw.io import load_dataset
from mep_hw.io.runs import write_json
from mep_hw.model import LayeredHopfield, one_hot
from mep_hw.settle import SettleConfig, settle

__all__ = ["implicit_gradient", "run", "main"]

F64 = torch.float64


def _cg(hvp, b: torch.Tensor, rtol: float = 1e-12, max_iter: int = 2000) -> tuple[torch.Tensor, int]:
    """Solve H x = b for symmetric positive-definite H given as a product."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = float(r @ r)
    stop = rtol**2 * float(b @ b)
    for it in range(max_iter):
        if rr <= stop:
            return x, it
        Hp = hvp(p)
        a = rr / float(p @ Hp)
        x.add_(p, alpha=a)
        r.add_(Hp, alpha=-a)
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, max_iter


def implicit_gradient(m: LayeredHopfield, x, y, free_states):
    """dL/dθ of L = mean_b C(s*_b) by implicit differentiation at the free fixed point (the
    smooth activation: no unit is pinned)."""
    sizes = list(m.state_sizes)
    flat = torch.cat(free_states, 1).reshape(-1).detach()

    def split(v):
        return list(v.reshape(x.shape[0], -1).split(sizes, 1))

    v = flat.clone().requires_grad_(True)
    dE = torch.autograd.grad(m.energy(x, split(v)).sum(), v, create_graph=True)[0]

    def hvp(p):
        return torch.autograd.grad(dE, v, p, retain_graph=True)[0]

    w = flat.clone().requires_grad_(True)
    dC = torch.autograd.grad(m.cost_fn(split(w), y).mean(), w)[0]
    lam, iters = _cg(hvp, dC)
    v2 = flat.clone().requires_grad_(True)
    dE2 = torch.autograd.grad(m.energy(x, split(v2)).sum(), v2, create_graph=True)[0]
    obj = m.cost_fn(split(flat), y).mean() - (dE2 * lam).sum()
    params = m.param_list()
    grads = torch.autograd.grad(obj, params, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)], iters


def _compare(est, ref) -> tuple[float, float]:
    num = sum(float(((a - b) ** 2).sum()) for a, b in zip(est, ref))
    den = sum(float((b**2).sum()) for b in ref)
    dot = sum(float((a * b).sum()) for a, b in zip(est, ref))
    na = sum(float((a**2).sum()) for a in est) ** 0.5
    return (num / den) ** 0.5, dot / (na * den**0.5)


def run(layers, cost: str, batch: int, data_dir, betas, points, budgets, out: Path, seed: int = 0) -> dict:
    ds = load_dataset("mnist" if data_dir else "digits", data_dir, limit_train=batch)
    layers = (ds.input_dim, *layers[1:-1], ds.n_classes)
    m = LayeredHopfield(layers, activation="sigmoid", cost=cost, generator=torch.Generator().manual_seed(seed), dtype=F64)
    x = torch.as_tensor(ds.x_train[:batch], dtype=F64)
    y = one_hot(torch.as_tensor(ds.y_train[:batch]), ds.n_classes, F64)
    tight = SettleConfig(solver="rk4", dt=0.5, atol=1e-12, rtol=0, max_steps=20000)
    t0 = time.perf_counter()
    free = settle(m.dynamics(x), m.forward_init(m.dynamics(x)), tight)
    ref, cg_iters = implicit_gradient(m, x, y, free.states)
    t_ref = time.perf_counter() - t0
    rows = []
    for budget in budgets:
        nudged = tight if budget is None else SettleConfig(solver="euler", dt=0.5, atol=1e-300, rtol=0, max_steps=int(budget))
        for N in points:
            for beta in betas:
                cfg = EPConfig(beta=float(beta), estimator="symmetric" if N == 2 else "holomorphic", points=max(N, 2),
                               init="forward", free=tight, nudged=nudged)
                t1 = time.perf_counter()
                r = ep_gradients(m, x, y, cfg, free_states=free.states)
                secs = time.perf_counter() - t1
                cost_evals = sum(float(res.steps.double().mean()) * (2 if res.states[0].is_complex() else 1) for res in r.nudged)
                err, cos = _compare(r.grads, ref)
                rows.append({"estimator": "symmetric" if N == 2 else f"holomorphic N={N}", "N": N, "beta": float(beta),
                             "budget_steps": budget, "rel_error": err, "cosine": cos,
                             "real_equivalent_phases": sum(2 if res.states[0].is_complex() else 1 for res in r.nudged),
                             "nudged_field_evals_per_sample": cost_evals, "seconds": secs})
                print(f"T={budget or 'conv.'} {rows[-1]['estimator']:>16} |β|={beta:<6g} err {err:.3e} cos {cos:.6f} "
                      f"cost {cost_evals:.0f} evals ({secs:.1f}s)", flush=True)
    report = {
        "benchmark": "holomorphic_vs_symmetric",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "network": {"layers": list(layers), "activation": "sigmoid", "cost": cost, "dtype": "float64", "seed": seed},
        "data": {"dataset": ds.name, "batch": batch},
        "reference": {"method": "implicit differentiation, CG on Hessian-vector products", "cg_iterations": cg_iters,
                      "free_steps_mean": float(free.steps.double().mean()), "seconds": t_ref,
                      "grad_norm": sum(float((g**2).sum()) for g in ref) ** 0.5},
        "results": rows,
    }
    write_json(out, report)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="MNIST folder (default: scikit-learn digits)")
    p.add_argument("--layers", default="784,500,500,10", help="layer sizes; the first and last follow the dataset")
    p.add_argument("--cost", default="mse", choices=("mse", "ce"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--betas", default="0.05,0.1,0.2,0.4,0.8")
    p.add_argument("--points", default="2,3,4,6", help="N of the holomorphic estimator (2: symmetric)")
    p.add_argument("--budgets", default="conv,10,20,40", help="nudged Euler steps per phase ('conv': to convergence)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/holomorphic.json")
    a = p.parse_args(argv)
    layers = tuple(int(v) for v in a.layers.split(","))
    budgets = [None if b == "conv" else int(b) for b in a.budgets.split(",")]
    run(layers, a.cost, a.batch, a.data_dir, [float(b) for b in a.betas.split(",")], [int(n) for n in a.points.split(",")],
        budgets, Path(a.out), a.seed)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does the layered Hopfield settle converge at a given Euler step? Residuals after N steps
across activations, initialisations, weight scales and steps dt.

    python -m mep_hw.benchmarks.settle_dt --data-dir ../shared/data/mnist --out benchmarks/results/settle_dt.json

For each activation, network (784-500-10 and 784-500-500-10 with MSE, 784-500-10 with the
cross-entropy readout), weight scale (× 1, 1.5, 2.5 of the default initialisation, seeds 0
and 1, and the weights after one epoch of training at dt = 0.25 on 10,000 images), 100 MNIST images are
settled in the free phase and, from the free state, in the nudged phases ±β (β = 0.5, MSE or CE
as the network's cost), at dt = 1, 0.5 and 0.25. Per case: the share of samples that meet the training defaults' test
within the training defaults' step limits (the activation's settle times of
:data:`mep_hw.train.config.SETTLE_TIME` / dt; free: atol 1e-4, rtol 1e-2; nudged: atol 1e-5), and the rms residual after ``--steps`` steps (median, max) of a settle run
towards 1e-7 (a sample that gets there stops; a cycling sample keeps its residual).

Why the sigmoid needs a smaller step (see docs/settle.md): Euler converges iff every eigenvalue
of the energy's Hessian H = I − diag(ρ''(s)⊙d) − D_ρ'𝒲D_ρ' lies in (0, 2/dt). At a fixed point
s = ρ'(s)d, so the diagonal term is −ρ''(s)d = 4s(2σ(4s−2) − 1) for ρ(s) = σ(4s − 2): about
4|s| for a saturated unit. Units driven to |s| ≈ 1 give H ≈ 4 + …, and dt = 1 overshoots:
the iteration s ← ρ'(s)d (Euler at dt = 1) then settles into a period-2 cycle instead of the
fixed point. The hard sigmoid's field is the rate form clip(d) − s, whose Jacobian is the
coupling alone (ρ'' = 0 inside the box), so dt = 1 is stable whenever ‖𝒲‖ < 1.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from mep_hw.io import load_dataset
from mep_hw.io.runs import read_json, write_json
from mep_hw.model import LayeredHopfield, one_hot
from mep_hw.settle import SettleConfig, settle
from mep_hw.train.config import SETTLE_TIME

__all__ = ["run", "main", "NETS"]

NETS = {"784-500-10 mse": ((784, 500, 10), "mse"), "784-500-500-10 mse": ((784, 500, 500, 10), "mse"), "784-500-10 ce": ((784, 500, 10), "ce")}
BETA = 0.5
FREE = dict(atol=1e-4, rtol=1e-2)  # TrainConfig's free-phase tolerances
NUDGED = dict(atol=1e-5, rtol=0.0)  # and its nudged-phase ones


def _phases(model, x, y):
    """(name, dynamics, start) of the free phase and the two nudged phases (from the free state,
    settled tightly)."""
    dyn = model.dynamics(x)
    start = model.forward_init(dyn)
    free = settle(dyn, start, SettleConfig(dt=0.25, atol=1e-7, rtol=0.0, max_steps=4000), throw=False).states
    return [("free", dyn, start), ("+beta", dyn.nudge(BETA, y), list(free)), ("-beta", dyn.nudge(-BETA, y), list(free))]


def measure(model, x, y, dts, steps: int) -> dict:
    out = {}
    times = SETTLE_TIME[model.act.name]
    for phase, dyn, start in _phases(model, x, y):
        for dt in dts:
            lim = FREE if phase == "free" else NUDGED
            budget = max(1, round((times[0] if phase == "free" else times[1]) / dt))  # TrainConfig's step limits at this dt
            ok = settle(dyn, start, SettleConfig(dt=dt, max_steps=budget, **lim), throw=False)
            long = settle(dyn, start, SettleConfig(dt=dt, atol=1e-7, rtol=0.0, max_steps=steps), throw=False)
            out[f"{phase} dt={dt:g}"] = {
                "converged_within_default_limit": float((ok.status == 0).float().mean()),
                "steps_mean": float(ok.steps.float().mean()),
                "residual_median": float(long.residual.median()), "residual_max": float(long.residual.max()),
                "nonfinite": int((long.status == 2).sum()),
            }
    return out


def _trained(activation, layers, cost, data_dir, dt) -> LayeredHopfield:
    """A network after one epoch of ``mep-hw train`` on 10,000 MNIST images at step ``dt`` (step
    limits: the activation's settle times / dt)."""
    from mep_hw.train import TrainConfig, train

    cfg = TrainConfig(dataset="mnist", data_dir=data_dir, layers=layers, activation=activation, cost=cost, epochs=1,
                      limit_train=10_000, limit_test=100, dt=dt)
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run", progress=False)
        state = torch.load(Path(tmp) / "run" / "checkpoint.pt", weights_only=True)["model"]
    model = LayeredHopfield(layers, activation=activation, cost=cost)
    model.load_state_dict(state)
    return model


def run(data_dir, out: Path, steps: int = 500, seeds=(0, 1), scales=(1.0, 1.5, 2.5), dts=(1.0, 0.5, 0.25),
        nets=tuple(NETS), trained_dt: float = 0.25, activations=("hard_sigmoid", "sigmoid"), log=print) -> dict:
    """Measure every case; results are merged into ``out`` if it exists (a case measured again
    replaces its old entry), so activations and nets can be run one at a time."""
    ds = load_dataset("mnist", data_dir, limit_train=100, limit_test=1)
    x = torch.as_tensor(ds.x_train[:100])
    y = one_hot(torch.as_tensor(ds.y_train[:100]), 10, x.dtype)
    report = {"steps": steps, "beta": BETA, "free_defaults": FREE, "nudged_defaults": NUDGED, "settle_time": SETTLE_TIME,
              "results": read_json(out)["results"] if out.exists() else []}
    for activation in activations:
        for net in nets:
            layers, cost = NETS[net]
            cases = []
            for seed in seeds:
                base = LayeredHopfield(layers, activation=activation, cost=cost, generator=torch.Generator().manual_seed(seed))
                for scale in scales:
                    m = copy.deepcopy(base)
                    with torch.no_grad():
                        for w in m.weights:
                            w.mul_(scale)
                    cases.append((f"seed {seed}, weights x {scale:g}", m))
            if trained_dt:
                cases.append((f"after 1 epoch (10k images, dt {trained_dt:g})", _trained(activation, layers, cost, data_dir, trained_dt)))
            for label, m in cases:
                sig = [float(torch.linalg.matrix_norm(w.detach().double(), 2)) for w in m.weights]
                res = measure(m, x, y, dts, steps)
                entry = {"activation": activation, "net": net, "case": label, "sigma": sig, "phases": res}
                key = (activation, net, label)
                report["results"] = [r for r in report["results"] if (r["activation"], r["net"], r["case"]) != key] + [entry]
                worst = {dt: min(v["converged_within_default_limit"] for k, v in res.items() if k.endswith(f"dt={dt:g}")) for dt in dts}
                rmax = {dt: max(v["residual_max"] for k, v in res.items() if k.endswith(f"dt={dt:g}")) for dt in dts}
                log(f"{activation:12s} {net:18s} {label:34s} " + " | ".join(
                    f"dt {dt:g}: conv≥{worst[dt]:.2f} res≤{rmax[dt]:.1e}" for dt in dts))
                write_json(out, report)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mep_hw.benchmarks.settle_dt", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
    p.add_argument("--out", default="benchmarks/results/settle_dt.json")
    p.add_argument("--steps", type=int, default=500, help="steps of the long settle whose residual is reported")
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--activations", nargs="+", default=["hard_sigmoid", "sigmoid"], choices=["hard_sigmoid", "sigmoid"])
    p.add_argument("--scales", nargs="+", type=float, default=[1.0, 1.5, 2.5], help="weight scales of the default initialisation")
    p.add_argument("--no-trained", action="store_true", help="skip the trained-weights case")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    run(a.data_dir, Path(a.out), steps=a.steps, nets=tuple(a.nets), trained_dt=0.0 if a.no_trained else 0.25,
        activations=tuple(a.activations), scales=tuple(a.scales))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

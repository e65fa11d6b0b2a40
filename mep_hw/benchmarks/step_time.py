"""EP step time vs backprop step time for the same MLP and batch, measured in one run.

    python -m mep_hw.benchmarks.step_time --data-dir ../shared/data --out benchmarks/results/step_time.json

Four copies of the MNIST MLP 784-256-10 (ReLU, cross-entropy) start from the same weights and
take steps on the same batches of 128: ``smep`` (EP + Muon + spectral constraint),
``smep_unconstrained`` (EP + Muon), ``muon_backprop`` (backprop + Muon) and ``adam`` (backprop +
Adam). Steps are timed in interleaved rounds (each round: ``steps`` steps of every
optimizer in turn), so a slowdown of the machine hits all of them alike; the figure is the
median step time of each and their ratios.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from mep_hw.io import load_dataset
from mep_hw.io.runs import write_json
from mep_hw.optimizers import muon_backprop, smep


def _optimizers(model0):
    made = {}
    for name in ("smep", "smep_unconstrained", "muon_backprop", "adam"):
        m = copy.deepcopy(model0)
        if name == "smep":
            opt = smep(m.parameters(), model=m)
        elif name == "smep_unconstrained":
            opt = smep(m.parameters(), model=m, use_spectral_constraint=False)
        elif name == "muon_backprop":
            opt = muon_backprop(m.parameters())
        else:
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        made[name] = (m, opt, name.startswith("smep"))
    return made


def _step(model, opt, is_ep, x, y):
    opt.zero_grad(set_to_none=True)
    if is_ep:
        model(x)
        opt.step(target=y)
    else:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def run(data_dir, out: Path, batch: int = 128, rounds: int = 8, steps: int = 25, warmup: int = 50) -> dict:
    ds = load_dataset("mnist", data_dir)
    x, y = torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train)
    torch.manual_seed(0)
    model0 = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    made = _optimizers(model0)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    batches = [perm[i : i + batch] for i in range(0, x.shape[0] - batch + 1, batch)]
    k = 0
    for _ in range(warmup):  # past the first steps, whose settles are not typical
        idx = batches[k % len(batches)]
        k += 1
        for m, opt, ep in made.values():
            _step(m, opt, ep, x[idx], y[idx])
    times = {name: [] for name in made}
    nudged = []
    for _ in range(rounds):
        chunk = [batches[(k + i) % len(batches)] for i in range(steps)]
        k += steps
        for name, (m, opt, ep) in made.items():
            for idx in chunk:
                t0 = time.perf_counter()
                _step(m, opt, ep, x[idx], y[idx])
                times[name].append(time.perf_counter() - t0)
                if name == "smep":
                    nudged.append(float(opt.last_result.nudged[0].steps.float().mean()))
    med = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    report = {
        "benchmark": "step_time", "model": "784-256-10 ReLU MLP, cross-entropy", "batch": batch,
        "rounds": rounds, "steps_per_round": steps, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "step_ms_median": med,
        "ratio_smep_over_muon_backprop": med["smep"] / med["muon_backprop"],
        "ratio_smep_unconstrained_over_muon_backprop": med["smep_unconstrained"] / med["muon_backprop"],
        "ratio_smep_over_adam": med["smep"] / med["adam"],
        "nudged_steps_mean": sum(nudged) / len(nudged),
    }
    write_json(out, report)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="benchmarks/results/step_time.json")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    a = p.parse_args(argv)
    r = run(a.data_dir, Path(a.out), rounds=a.rounds, steps=a.steps)
    m = r["step_ms_median"]
    print(" ".join(f"{k} {v:.2f} ms" for k, v in m.items()))
    print(f"smep ÷ muon_backprop {r['ratio_smep_over_muon_backprop']:.2f}; unconstrained ÷ muon_backprop "
          f"{r['ratio_smep_unconstrained_over_muon_backprop']:.2f}; smep ÷ adam {r['ratio_smep_over_adam']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

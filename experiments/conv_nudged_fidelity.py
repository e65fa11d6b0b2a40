"""How far the EP gradient of a trained conv net moves when its nudged settles get more sweeps.

Loads a training run's folder (its ``config.toml`` and ``checkpoint.pt``), takes the first N
training images, and computes the EP estimate of the run's own settings with the nudged step
limit at each of the given values (the free phase unchanged). Reports, per limit: the share of
nudged settles that end at the limit, their mean sweeps, and the cosine and relative norm of
each estimate against the one with the largest limit.

    python experiments/conv_nudged_fidelity.py RUN_DIR --limits 20,40,100,400 --n 200 \\
        --out benchmarks/results/conv_fashion_same3_nudged_fidelity.json

Used in docs/conv.md ("3×3 kernels with same padding") to ask whether the nudged settles that
stop at the 20-step limit give a gradient far from a settled one.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
from pathlib import Path

import torch

from mep_hw.benchmarks.conv_solvers import _cos, _flat
from mep_hw.ep import ep_gradients
from mep_hw.io import load_dataset
from mep_hw.io.runs import load_checkpoint, read_toml, write_json
from mep_hw.model import build_network, one_hot
from mep_hw.train import TrainConfig


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--limits", default="20,40,100,400", help="nudged step limits, comma-separated")
    p.add_argument("--n", type=int, default=200, help="training images (the first n)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    limits = sorted(int(v) for v in a.limits.split(","))
    cfg = TrainConfig.from_dict(read_toml(a.run_dir / "config.toml"))
    ds = load_dataset(cfg.dataset, cfg.data_dir, limit_train=a.n, limit_test=1)
    model = build_network(arch=cfg.arch, layers=None, input_shape=ds.input_shape, n_classes=ds.n_classes,
                          activation=cfg.activation, cost=cfg.cost, seed=cfg.seed, dtype=cfg.torch_dtype)
    ckpt = load_checkpoint(a.run_dir / "checkpoint.pt")
    model.load_state_dict(ckpt["model"])
    x = torch.as_tensor(ds.x_train[: a.n]).to(cfg.torch_dtype)
    y = one_hot(torch.as_tensor(ds.y_train[: a.n]), ds.n_classes).to(x)
    grads, rows = {}, {}
    for lim in limits:
        ep = cfg.replace(nudged_max_steps=lim).ep_config()
        torch.manual_seed(0)
        r = ep_gradients(model, x, y, ep)
        grads[lim] = _flat(r.grads)
        rows[lim] = {
            "nudged": dataclasses.asdict(ep.nudged),
            "free_steps_mean": float(r.free.steps.double().mean()),
            "nudged_steps_mean": [float(q.steps.double().mean()) for q in r.nudged],
            "nudged_step_limit_frac": [float((q.steps >= lim).double().mean()) for q in r.nudged],
        }
        print(f"limit {lim}: at limit {rows[lim]['nudged_step_limit_frac']}, sweeps {rows[lim]['nudged_steps_mean']}",
              flush=True)
    ref = grads[limits[-1]]
    for lim in limits:
        g = grads[lim]
        rows[lim]["cos_vs_largest_limit"] = _cos(g, ref)
        rows[lim]["norm_over_largest_limit"] = float(g.norm() / ref.norm().clamp_min(1e-300))
    report = {
        "experiment": "conv_nudged_fidelity",
        "run_dir": str(a.run_dir),
        "epochs_completed": ckpt.get("epoch"),
        "images": a.n,
        "config": cfg.to_dict(),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "limits": {str(k): v for k, v in rows.items()},
    }
    write_json(a.out, report)
    return report


if __name__ == "__main__":
    main()

"""Over-relaxed block sweeps: sweeps per batch, time and gradient accuracy against ω.

    python -m mep_hw.benchmarks.block_omega --data-dir ../shared/data/mnist \\
        --layers 784,500,10 784,500,500,10 784,500,500,500,10 --out benchmarks/results/block_omega.json

For each net: the defaults (one-sided EP, block solver) trained one epoch on the first 10 000
MNIST images; then, on 20 batches of 100 of the next epoch, the EP gradient with each relaxation
for both phases — ω for both parities (``--omega``), or ω for the first parity (the output layer's)
with the second set exactly (``--omega-first``): settle loop iterations per batch (free + nudged;
the slowest sample sets them), the time per EP gradient (one thread; the variants interleaved
batch by batch), the cosine with the estimate of phases settled to atol 1e-9 (3000 sweeps at
most), and the samples left at a step limit.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from mep_hw.ep import ep_gradients
from mep_hw.io import load_dataset
from mep_hw.io.runs import write_json
from mep_hw.model import one_hot
from mep_hw.settle import SettleStatus
from mep_hw.train import TrainConfig
from mep_hw.train.fit import epoch_generator, iterate_batches
from mep_hw.train.loop import EPTrainer, build_model
from mep_hw.train.regimes import build_regime

__all__ = ["measure", "main"]


def measure(ds, layers: str, omegas, *, batches: int = 20, omegas_first=()) -> dict:
    """``omegas``: ω for both parities; ``omegas_first``: ω for the first parity, the second exact."""
    cfg = TrainConfig(layers=layers, estimator="one-sided", solver="block")
    x, y = torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train)
    n = x.shape[0]
    model = build_model(cfg, x.shape[1], ds.n_classes)
    tr = EPTrainer(model, cfg, build_regime(model, cfg, n), x[:1], y[:1])
    tr.begin_epoch(1)
    gen = epoch_generator(cfg.seed, 1)
    for idx in iterate_batches(n, cfg.batch_size, epoch_generator(cfg.seed, 1)):
        tr.step(x.index_select(0, idx), y.index_select(0, idx), gen)
    base = cfg.ep_config()
    exact = replace(base, free=replace(base.free, atol=1e-9, max_steps=3000, omega=1.0, omega_first=None),
                    nudged=replace(base.nudged, atol=1e-9, max_steps=3000, omega=1.0, omega_first=None))
    idxs = iterate_batches(n, cfg.batch_size, epoch_generator(cfg.seed, 2))[:batches]
    bs = [(x.index_select(0, i), one_hot(y.index_select(0, i), ds.n_classes)) for i in idxs]
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    refs = [flat(ep_gradients(model, xb, tb, exact, check=False).grads) for xb, tb in bs]
    variants = [(om, om) for om in omegas] + [(om, 1.0) for om in omegas_first]  # (first parity's, second's)
    acc = {v: {"seconds": 0.0, "sweeps": 0, "cos": [], "at_limit": 0} for v in variants}
    cfgs = {v: replace(base, free=replace(base.free, omega_first=v[0], omega=v[1]),
                       nudged=replace(base.nudged, omega_first=v[0], omega=v[1])) for v in variants}
    for (xb, tb), r in zip(bs, refs):
        for om in variants:  # interleaved: a slowdown of the machine hits every ω alike
            t0 = time.perf_counter()
            res = ep_gradients(model, xb, tb, cfgs[om], check=False)
            a = acc[om]
            a["seconds"] += time.perf_counter() - t0
            g = flat(res.grads)
            a["cos"].append(float(g @ r / (g.norm() * r.norm())))
            a["sweeps"] += res.free.nfev + res.nudged[0].nfev
            a["at_limit"] += int((res.free.status != SettleStatus.CONVERGED).sum() + (res.nudged[0].status != SettleStatus.CONVERGED).sum())
    rows = [{"omega_first": om[0], "omega": om[1], "sweeps_per_batch": a["sweeps"] / len(bs), "ms_per_gradient": 1e3 * a["seconds"] / len(bs),
             "cosine_mean": sum(a["cos"]) / len(a["cos"]), "cosine_min": min(a["cos"]), "samples_at_step_limit": a["at_limit"]}
            for om, a in acc.items()]
    for r in rows:
        print(f"{layers} omega {r['omega_first']:g}/{r['omega']:g}: {r['sweeps_per_batch']:.1f} sweeps per batch, {r['ms_per_gradient']:.1f} ms, "
              f"cosine {r['cosine_mean']:.5f}, {r['samples_at_step_limit']} samples at a step limit", flush=True)
    return {"layers": layers, "default_omegas": list(cfg.block_omegas()), "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with the MNIST IDX files")
    p.add_argument("--layers", nargs="+", default=["784,500,10", "784,500,500,10", "784,500,500,500,10"])
    p.add_argument("--omega", type=float, nargs="+", default=[1.0, 1.2, 1.4, 1.6], help="ω for both parities")
    p.add_argument("--omega-first", type=float, nargs="*", default=[1.2, 1.3, 1.4, 1.5],
                   help="ω for the first parity (the output layer's), the second set exactly")
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results/block_omega.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    ds = load_dataset("mnist", a.data_dir, limit_train=a.limit_train, limit_test=1)
    nets = [measure(ds, layers, a.omega, batches=a.batches, omegas_first=a.omega_first) for layers in a.layers]
    write_json(Path(a.out), {"benchmark": "block_omega", "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                                                    "threads": 1}, "limit_train": a.limit_train, "nets": nets})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

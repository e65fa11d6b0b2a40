"""Steady-state tolerances of the two one-sided EP phases against the gradient's accuracy and
the settle's cost (block solver).

    python -m mep_hw.benchmarks.ep_tolerance --data-dir ../shared/data/mnist \\
        --layers 784,500,10 784,500,500,10 784,500,500,500,10 --out benchmarks/results/ep_tolerance.json

For each net: train the defaults 2 epochs on the first 10 000 MNIST images (so the settles take
the sweeps a training run's take), then on 20 batches of 100 of the next epoch compute the EP
gradient with each (free atol, nudged atol) pair and its cosine with the EP gradient of phases
settled to atol 1e-9 (2000 sweeps at most), and the settle sweeps per batch (free + nudged,
``SettleResult.nfev``: the loop iterations, which the slowest sample of the batch sets).
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
from mep_hw.train import TrainConfig
from mep_hw.train.fit import epoch_generator, iterate_batches
from mep_hw.train.loop import EPTrainer, build_model
from mep_hw.train.regimes import build_regime

__all__ = ["measure", "main"]

PAIRS = ((1e-5, 1e-5), (3e-5, 1e-5), (1e-4, 1e-5), (1e-5, 3e-5), (3e-5, 3e-5), (1e-4, 1e-4))


def measure(ds, layers: str, *, train_epochs: int = 2, batches: int = 20, pairs=PAIRS) -> dict:
    cfg = TrainConfig(layers=layers, estimator="one-sided", solver="block")
    x, y = torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train)
    n = x.shape[0]
    model = build_model(cfg, x.shape[1], ds.n_classes)
    tr = EPTrainer(model, cfg, build_regime(model, cfg, n), x[:1], y[:1])
    for ep in range(1, train_epochs + 1):
        tr.begin_epoch(ep)
        gen = epoch_generator(cfg.seed, ep)
        for idx in iterate_batches(n, cfg.batch_size, epoch_generator(cfg.seed, ep)):
            tr.step(x.index_select(0, idx), y.index_select(0, idx), gen)
    base = cfg.ep_config()
    exact = replace(base, free=replace(base.free, atol=1e-9, max_steps=2000), nudged=replace(base.nudged, atol=1e-9, max_steps=2000))
    idxs = iterate_batches(n, cfg.batch_size, epoch_generator(cfg.seed, train_epochs + 1))[:batches]
    bs = [(x.index_select(0, i), one_hot(y.index_select(0, i), ds.n_classes)) for i in idxs]
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    refs = [flat(ep_gradients(model, xb, tb, exact, check=False).grads) for xb, tb in bs]
    rows = []
    for fa, na in pairs:
        c = replace(base, free=replace(base.free, atol=fa), nudged=replace(base.nudged, atol=na))
        cos, sweeps = [], 0
        t0 = time.perf_counter()
        for (xb, tb), r in zip(bs, refs):
            res = ep_gradients(model, xb, tb, c, check=False)
            g = flat(res.grads)
            cos.append(float(g @ r / (g.norm() * r.norm())))
            sweeps += res.free.nfev + res.nudged[0].nfev
        rows.append({"free_atol": fa, "nudged_atol": na, "cosine_mean": sum(cos) / len(cos), "cosine_min": min(cos),
                     "sweeps_per_batch": sweeps / len(bs), "ms_per_batch": 1e3 * (time.perf_counter() - t0) / len(bs)})
        print(f"{layers} free {fa:g} nudged {na:g}: cosine {rows[-1]['cosine_mean']:.5f}, "
              f"{rows[-1]['sweeps_per_batch']:.1f} sweeps per batch", flush=True)
    return {"layers": layers, "defaults_now": {"free": cfg.free_tolerance(), "nudged": cfg.nudged_tolerance()}, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with the MNIST IDX files")
    p.add_argument("--layers", nargs="+", default=["784,500,10", "784,500,500,10", "784,500,500,500,10"])
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/ep_tolerance.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ds = load_dataset("mnist", a.data_dir, limit_train=a.limit_train, limit_test=1)
    nets = [measure(ds, layers, batches=a.batches) for layers in a.layers]
    write_json(Path(a.out), {"benchmark": "ep_tolerance", "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                                                     "threads": a.threads},
                             "limit_train": a.limit_train, "batches": a.batches, "nets": nets})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

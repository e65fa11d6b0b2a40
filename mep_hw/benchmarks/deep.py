"""Deep EP with the defaults: accuracy, settle steps per phase, and the EP epoch against the
backprop epoch of the same MLP, interleaved batch by batch in one process.

    python -m mep_hw.benchmarks.deep --data-dir /work/shared/data/mnist --layers 784,500,500,10 \
        --epochs 15 --out benchmarks/results/deep_784-500-500-10.json

Trains the default EP run (``TrainConfig`` defaults, only dataset, layers and epochs given, plus
``--set key=value`` for a study) with :func:`mep_hw.train.train`. After every EP step, on the
same batch, one step of a plain PyTorch MLP of the same shape trained by backprop: hidden units
the hard sigmoid of the EP run, the readout of the EP run's cost (``ce``: softmax cross-entropy
of linear logits; ``mse``: a linear output with the same MSE), the same optimizer and schedule.
Interleaving puts both under the same machine load at every moment; the backprop step's time is
measured on its own and taken out of the EP epoch's. Writes one JSON file: per-epoch test
accuracy of both, epoch times, their ratio (median over epochs), mean settle steps per sample
of the free and of each nudged phase, and the share of nudged samples at their step limit.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from mep_hw.benchmarks._baseline import config_sets, ep_vs_backprop
from mep_hw.benchmarks.foundation import _Clip01
from mep_hw.errors import ConfigError
from mep_hw.io import load_dataset
from mep_hw.io.runs import write_json
from mep_hw.train import TrainConfig, train
from mep_hw.train.config import layer_lr_scales
from mep_hw.train.fit import epoch_generator, iterate_batches

__all__ = ["InterleavedBackprop", "run", "main"]


class InterleavedBackprop:
    """The backprop MLP of the EP run, stepped on the EP run's batches by ``on_batch``."""

    def __init__(self, cfg: TrainConfig, ds):
        torch.manual_seed(cfg.seed)
        layers = cfg.layers
        mods: list[nn.Module] = []
        for n_in, n_out in zip(layers[:-2], layers[1:-1]):
            mods += [nn.Linear(n_in, n_out), _Clip01()]
        self.net = nn.Sequential(*mods, nn.Linear(layers[-2], layers[-1]))
        self.cfg = cfg
        self.xtr, self.ytr = torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train)
        self.xte, self.yte = torch.as_tensor(ds.x_test), torch.as_tensor(ds.y_test)
        n = self.xtr.shape[0]
        # the EP run's per-layer learning rates on the same shapes (TrainConfig.lr_width)
        lins = [m for m in self.net if isinstance(m, nn.Linear)]
        scales = layer_lr_scales(layers, cfg.cost, cfg.lr_width)
        groups = [{"params": [m.weight], "lr": cfg.lr * k} for m, k in zip(lins, scales)]
        groups.append({"params": [m.bias for m in lins], "lr": cfg.lr})
        # torch's Adam / SGD with the EP run's hyperparameters: the cheapest correct baseline
        if cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            raise ConfigError(f"the interleaved backprop baseline takes optimizer adam or sgd, not {cfg.optimizer!r}")
        steps = cfg.epochs * -(-n // cfg.batch_size)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(1, steps)) if cfg.schedule == "cosine" else None
        self._epoch, self._batches = None, None
        self.seconds: dict[int, float] = {}
        self.test_accuracy: dict[int, float] = {}

    def loss(self, x, y):
        out = self.net(x)
        if self.cfg.cost == "ce":
            return nn.functional.cross_entropy(out, y)
        return 0.5 * ((out - nn.functional.one_hot(y, out.shape[1]).to(out.dtype)) ** 2).sum(1).mean()

    def on_batch(self, epoch: int, b: int) -> None:
        if epoch != self._epoch:  # the EP run's permutation of this epoch, drawn again from its seed
            if self._epoch is not None:
                self.evaluate(self._epoch)
            self._epoch = epoch
            self._batches = iterate_batches(self.xtr.shape[0], self.cfg.batch_size, epoch_generator(self.cfg.seed, epoch))
        t0 = time.perf_counter()
        idx = self._batches[b]
        x, y = self.xtr.index_select(0, idx), self.ytr.index_select(0, idx)
        self.opt.zero_grad(set_to_none=True)
        self.loss(x, y).backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.seconds[epoch] = self.seconds.get(epoch, 0.0) + time.perf_counter() - t0

    @torch.no_grad()
    def evaluate(self, epoch: int) -> None:
        self.test_accuracy[epoch] = float((self.net(self.xte).argmax(1) == self.yte).float().mean())


def run(cfg: TrainConfig, out: Path, run_dir: Path | None = None) -> dict:
    ds = load_dataset(cfg.dataset, cfg.data_dir, limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    cfg = cfg.replace(layers=cfg.layers or (ds.input_dim, 500, ds.n_classes))
    bp = InterleavedBackprop(cfg, ds)
    with tempfile.TemporaryDirectory() as tmp:
        res = train(cfg, run_dir or Path(tmp) / "ep", dataset=ds, progress=False, on_batch=bp.on_batch)
    bp.evaluate(cfg.epochs)
    hist = res.history
    ep_times = [h.epoch_seconds - bp.seconds[h.epoch] for h in hist]
    bp_times = [bp.seconds[h.epoch] for h in hist]
    n_nudged = {"one-sided": 1, "symmetric": 2}.get(cfg.estimator)  # holomorphic: N/2 + 1 real-or-complex phases
    report = {
        "benchmark": "deep",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "config": cfg.to_dict(),
        "ep_config": repr(cfg.ep_config()),
        **ep_vs_backprop(hist, ep_times, [bp.test_accuracy[h.epoch] for h in hist], bp_times),
    }
    report["ep"].update({
        "nudged_phases": n_nudged,
        "free_steps_mean_all": sum(h.free_steps_mean for h in hist) / len(hist),
        "nudged_steps_mean_all": sum(h.nudged_steps_mean for h in hist) / len(hist),
        "free_step_limit_frac": [h.free_step_limit_frac for h in hist],
    })
    write_json(out, report)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--layers", default="784,500,500,10")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other TrainConfig fields (a study, not the defaults)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--run-dir", default=None, help="keep the EP run folder here (default: a temporary folder)")
    a = p.parse_args(argv)
    cfg = TrainConfig(dataset=a.dataset, data_dir=a.data_dir, layers=a.layers, epochs=a.epochs,
                      limit_train=a.limit_train, limit_test=a.limit_test, seed=a.seed, **config_sets(a.set))
    r = run(cfg, Path(a.out), Path(a.run_dir) if a.run_dir else None)
    print(f"EP test accuracy {r['ep']['test_accuracy']:.4f} (backprop {r['backprop']['test_accuracy']:.4f}); "
          f"EP/backprop epoch time {r['ep_over_backprop_epoch_time']:.2f}; mean steps per sample: free "
          f"{r['ep']['free_steps_mean_all']:.2f}, each nudged phase {r['ep']['nudged_steps_mean_all']:.2f}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

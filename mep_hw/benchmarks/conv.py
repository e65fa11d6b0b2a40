"""Benchmark of the convolutional Hopfield network: EP accuracy and epoch time against a backprop
CNN of the same architecture, interleaved epoch by epoch in one process.

    python -m mep_hw.benchmarks.conv --dataset mnist --data-dir ../shared/data/mnist \\
        --arch conv:16:5,pool:2,conv:32:5,pool:2,fc:10 --epochs 10 --out benchmarks/results/conv_mnist.json

Epoch e of the EP run is trained by ``mep_hw.train.train`` (resumed from epoch e − 1: the real
training loop, checkpoints and all), then epoch e of the backprop CNN on the same batches
(``epoch_generator``), with the same initial weights, optimizer and schedule. The CNN is the
feed-forward network of the same energy: conv → pooling → ρ per conv layer, ρ after every
hidden fc layer, a linear output (cost ``mse``: ½‖out − y‖² against one-hot y; ``ce``: the
softmax cross-entropy of the readout), ρ the EP run's activation. With ``--augment`` both train
on the same flipped / shifted images (``mep_hw.train.augment``, one draw stream per epoch).
Writes one JSON file with both accuracy histories, the per-epoch times, their ratio (median over
epochs), and the EP run's mean settle steps per sample.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from mep_hw.io import load_dataset
from mep_hw.io.runs import write_json
from mep_hw.model import ConvHopfield, build_network
from mep_hw.train import TrainConfig, train
from mep_hw.benchmarks._baseline import baseline_optimizer, config_sets, ep_vs_backprop
from mep_hw.train.augment import augment_generator
from mep_hw.train.fit import epoch_generator, iterate_batches
from mep_hw.train.loop import batch_transform

__all__ = ["feedforward_cnn", "run", "main"]


class _Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def feedforward_cnn(model: ConvHopfield) -> nn.Sequential:
    """The feed-forward CNN of ``model``'s architecture, with its current weights copied in."""
    mods: list[nn.Module] = []
    act = _Act(model.act.fn)
    n = len(model.blocks)
    for l, blk in enumerate(model.blocks):
        g = blk.geometry
        if g is not None:
            conv = nn.Conv2d(g.c_in, g.c_out, g.kernel, padding=g.padding, dtype=model.weights[l].dtype)
            with torch.no_grad():
                conv.weight.copy_(model.kernel(l))
                conv.bias.copy_(model.biases[l])
            mods.append(conv)
            if g.pool == "max":
                mods.append(nn.MaxPool2d(g.pool_size))
            elif g.pool == "avg":
                mods.append(nn.AvgPool2d(g.pool_size))
            mods.append(act)
            if l + 1 < n and model.blocks[l + 1].geometry is None:
                mods.append(nn.Flatten())
        else:
            fc = nn.Linear(blk.n_in, blk.n_out, dtype=model.weights[l].dtype)
            with torch.no_grad():
                fc.weight.copy_(model.weights[l])
                fc.bias.copy_(model.biases[l])
            mods.append(fc)
            if l + 1 < n:
                mods.append(act)
    return nn.Sequential(nn.Unflatten(1, model.input_shape) if len(model.input_shape) == 3 else nn.Identity(), *mods)


def _report(cfg: TrainConfig, model0, ep_hist, bp_hist) -> dict:
    return {
        "benchmark": "conv",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    **({"gpu": torch.cuda.get_device_name()} if torch.device(cfg.torch_device).type == "cuda" else {})},
        "config": cfg.to_dict(),
        "arch": cfg.arch,
        "layers": list(model0.layers),
        "reads_per_sample": {"positions_per_weight": list(model0.positions())},
        "epochs_done": len(ep_hist),
        **ep_vs_backprop(ep_hist, [h.epoch_seconds for h in ep_hist], [h["test_accuracy"] for h in bp_hist],
                         [h["epoch_seconds"] for h in bp_hist]),
    }


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(cfg: TrainConfig, out: Path, run_dir: Path | None = None) -> dict:
    """Train the EP run and the backprop CNN epoch by epoch; the JSON is rewritten after every
    epoch, so an interrupted benchmark keeps the epochs it finished."""
    ds = load_dataset(cfg.dataset, cfg.data_dir, limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    model0 = build_network(arch=cfg.arch, layers=None, input_shape=ds.input_shape, n_classes=ds.n_classes,
                           activation=cfg.activation, cost=cfg.cost, seed=cfg.seed, dtype=cfg.torch_dtype)
    dev = torch.device(cfg.torch_device)
    net = feedforward_cnn(model0).to(dev)  # the EP run starts from the same weights (same seed), on its device
    xtr, ytr = torch.as_tensor(ds.x_train).to(dev), torch.as_tensor(ds.y_train).to(dev)
    xte, yte = torch.as_tensor(ds.x_test).to(dev), torch.as_tensor(ds.y_test).to(dev)
    n = xtr.shape[0]
    transform = batch_transform(cfg, ds)
    opt, sched = baseline_optimizer(cfg, net.parameters(), cfg.epochs * -(-n // cfg.batch_size))
    bp_hist, ep_hist = [], []
    with tempfile.TemporaryDirectory() as tmp:
        rd = run_dir or Path(tmp) / "ep"
        # the EP run is extended an epoch at a time; its cosine is planned over all cfg.epochs (one
        # cycle, as the CNN's), so each extension continues it rather than starting a new cycle
        plan = cfg.replace(cosine_cycles=(cfg.epochs,)) if cfg.schedule == "cosine" and cfg.cosine_cycles is None else cfg
        for epoch in range(1, cfg.epochs + 1):
            res = train(plan.replace(epochs=epoch), rd, resume=epoch > 1, explicit={"epochs"}, dataset=ds, progress=False)
            ep_hist = list(res.history)
            _sync(dev)
            t0 = time.perf_counter()
            aug_gen = augment_generator(cfg.seed, epoch)  # the EP run's augmented images, batch by batch
            for idx in iterate_batches(n, cfg.batch_size, epoch_generator(cfg.seed, epoch)):
                idx = idx.to(dev)
                x, y = xtr.index_select(0, idx), ytr.index_select(0, idx)
                if transform is not None:
                    x = transform(x, aug_gen)
                opt.zero_grad(set_to_none=True)
                pred = net(x)
                if cfg.cost == "ce":
                    loss = nn.functional.cross_entropy(pred, y)
                else:
                    loss = 0.5 * ((pred - nn.functional.one_hot(y, ds.n_classes).to(pred.dtype)) ** 2).sum(1).mean()
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
            _sync(dev)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                acc = sum(int((net(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum()) for i in range(0, len(xte), 1000)) / max(1, len(xte))
            bp_hist.append({"epoch": epoch, "epoch_seconds": seconds, "test_accuracy": acc})
            h = ep_hist[-1]
            print(f"epoch {epoch}: EP test acc {h.test_accuracy:.4f} ({h.epoch_seconds:.1f}s, steps free "
                  f"{h.free_steps_mean:.1f} nudged {h.nudged_steps_mean:.1f}) | backprop {acc:.4f} ({seconds:.1f}s)", flush=True)
            report = _report(cfg, model0, ep_hist, bp_hist)
            write_json(out, report)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    p.add_argument("--arch", default="conv:16:5,pool:2,conv:32:5,pool:2,fc:10")
    p.add_argument("--cost", default="mse", choices=("mse", "ce"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=None, help="default: the training default (Adam on a conv net: 0.03)")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--nudged-max-steps", type=int, default=20)
    p.add_argument("--augment", default="none", help="training-image augmentation, e.g. flip,shift:2 (both nets)")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/conv_mnist.json", help="JSON file to write")
    p.add_argument("--run-dir", default=None, help="keep the EP run folder here (default: a temporary folder)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="other TrainConfig fields, e.g. torch_device=cuda, estimator=symmetric, device=pcm")
    a = p.parse_args(argv)
    cfg = TrainConfig(dataset=a.dataset, data_dir=a.data_dir, arch=a.arch, cost=a.cost, epochs=a.epochs, lr=a.lr,
                      beta=a.beta, batch_size=a.batch_size, nudged_max_steps=a.nudged_max_steps,
                      limit_train=a.limit_train, limit_test=a.limit_test, seed=a.seed, augment=a.augment, **config_sets(a.set))
    r = run(cfg, Path(a.out), Path(a.run_dir) if a.run_dir else None)
    print(f"EP test accuracy {r['ep']['test_accuracy']:.4f} (backprop {r['backprop']['test_accuracy']:.4f}); "
          f"EP/backprop epoch time {r['ep_over_backprop_epoch_time']:.1f}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

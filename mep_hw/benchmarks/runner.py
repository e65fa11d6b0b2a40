"""Benchmark runner: train one model with several optimizers on the same data and compare.

    python -m mep_hw.benchmarks.runner --config mnist_mlp --baselines smep sdmep sgd adam muon_backprop --output DIR

``--config`` is a YAML file or the name of a shipped config (``mnist_mlp``, ``mnist_cnn``,
in ``mep_hw/benchmarks/configs``). Every baseline starts from the same initial weights and sees
the same batches. EP baselines (smep, sdmep, local_ep, natural_ep) train by forward pass +
``optimizer.step(target=y)``; the others by ``loss.backward()`` + ``optimizer.step()``.

Writes ``DIR/<baseline>.json`` (per-epoch log), ``DIR/results.json`` (all of it),
``DIR/summary.md`` (a Markdown table) and ``DIR/curves.png`` (test accuracy and training loss
against epoch and against wall time).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from mep_hw.errors import ConfigError, MepHwError
from mep_hw.io import load_dataset
from mep_hw.io.runs import write_json
from mep_hw.optimizers import local_ep, muon_backprop, natural_ep, sdmep, smep
from mep_hw.train.fit import Observer, fit

__all__ = ["BASELINES", "EP_BASELINES", "BenchConfig", "load_config", "build_model", "run", "main"]

EP_BASELINES = {"smep": smep, "sdmep": sdmep, "local_ep": local_ep, "natural_ep": natural_ep}
BP_BASELINES = {
    "muon_backprop": lambda params, **kw: muon_backprop(params, **kw),
    "sgd": lambda params, **kw: torch.optim.SGD(params, **kw),
    "adam": lambda params, **kw: torch.optim.Adam(params, **kw),
}
BASELINES = (*EP_BASELINES, *BP_BASELINES)
_KEYS = {"name", "dataset", "data_dir", "model", "epochs", "batch_size", "schedule", "seed", "limit_train", "limit_test", "optimizers"}


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    name: str
    dataset: str
    data_dir: str | None
    model: dict
    epochs: int
    batch_size: int
    schedule: str
    seed: int
    limit_train: int | None
    limit_test: int | None
    optimizers: dict

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"schedule={self.schedule!r}; valid: cosine, constant")
        for k in ("epochs", "batch_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{k}={v!r} must be an integer ≥ 1")
        unknown = sorted(set(self.optimizers) - set(BASELINES))
        if unknown:
            raise ConfigError(f"optimizers: unknown baseline(s) {', '.join(unknown)}; valid: {', '.join(BASELINES)}")


def load_config(path_or_name: str) -> BenchConfig:
    p = Path(path_or_name)
    if not p.exists():
        shipped = resources.files("mep_hw.benchmarks") / "configs" / f"{path_or_name}.yaml"
        if not shipped.is_file():
            names = sorted(f.name[:-5] for f in (resources.files("mep_hw.benchmarks") / "configs").iterdir() if f.name.endswith(".yaml"))
            raise ConfigError(f"--config {path_or_name}: no such file, and no shipped config of that name ({', '.join(names)})")
        text = shipped.read_text()
    else:
        text = p.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path_or_name} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path_or_name} must be a YAML mapping")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"--config {path_or_name}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(_KEYS))}")
    defaults = dict(data_dir=None, schedule="cosine", seed=0, limit_train=None, limit_test=None, optimizers={}, name=Path(path_or_name).stem)
    missing = sorted({"dataset", "model", "epochs", "batch_size"} - set(raw))
    if missing:
        raise ConfigError(f"--config {path_or_name}: missing key(s) {', '.join(missing)}")
    return BenchConfig(**{**defaults, **raw})


_ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "hard_sigmoid": nn.Hardsigmoid}


def build_model(spec: dict, input_shape, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    kind = spec.get("type")
    if kind == "mlp":
        act = _ACTS[spec.get("activation", "relu")]
        layers = spec["layers"]
        mods: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(layers[:-1], layers[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(layers) - 2:
                mods.append(act())
        return nn.Sequential(*mods)
    if kind == "cnn":
        c1, c2 = spec.get("channels", [16, 32])
        k = spec.get("kernel", 5)
        side = input_shape[-1]
        side = ((side - k + 1) // 2 - k + 1) // 2
        return nn.Sequential(
            nn.Conv2d(1, c1, k), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c1, c2, k), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * side * side, spec.get("classes", 10)),
        )
    raise ConfigError(f"model.type={kind!r}; valid: mlp, cnn")


def _tensors(cfg: BenchConfig, data_dir):
    ds = load_dataset(cfg.dataset, data_dir or cfg.data_dir, limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    side = int(math.isqrt(ds.input_dim))
    shape = (1, side, side) if cfg.model.get("type") == "cnn" else (ds.input_dim,)
    conv = lambda a: torch.as_tensor(a).reshape(-1, *shape)  # noqa: E731
    return conv(ds.x_train), torch.as_tensor(ds.y_train), conv(ds.x_test), torch.as_tensor(ds.y_test), shape


class _SequentialTrainer:
    """One baseline on an ``nn.Sequential`` for :func:`mep_hw.train.fit`: EP baselines take the
    forward pass as the free phase and ``optimizer.step(target=y)``; the others backprop."""

    def __init__(self, name: str, cfg: BenchConfig, model: nn.Sequential, kw: dict, steps_per_epoch: int, test):
        self.name, self.cfg, self.model = name, cfg, model
        self.is_ep = name in EP_BASELINES
        self.opt = EP_BASELINES[name](model.parameters(), model=model, **kw) if self.is_ep else BP_BASELINES[name](model.parameters(), **kw)
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, cfg.epochs * steps_per_epoch)
                      if cfg.schedule == "cosine" else None)
        self.xte, self.yte = test
        self.wall = 0.0

    def begin_epoch(self, epoch: int) -> None:
        self.model.train()
        self.loss_sum, self.settle_steps, self.n, self.step_times = 0.0, 0.0, 0, []

    def step(self, x, y, generator) -> None:
        ts = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        if self.is_ep:
            self.model(x)
            loss = self.opt.step(target=y)
            self.settle_steps += float(self.opt.last_result.nudged[0].steps.float().mean()) * len(y)
        else:
            loss = nn.functional.cross_entropy(self.model(x), y)
            loss.backward()
            self.opt.step()
        self.step_times.append(time.perf_counter() - ts)
        if self.sched is not None:
            self.sched.step()
        loss_value = float(loss.detach())
        self.loss_sum += loss_value * len(y)
        self.n += len(y)
        if not math.isfinite(loss_value):
            raise MepHwError(f"{self.name}: the training loss became {loss_value}; lower its lr")

    def end_epoch(self, epoch: int, seconds: float) -> dict:
        self.wall += seconds
        self.model.eval()
        with torch.no_grad():
            out = torch.cat([self.model(self.xte[i : i + 1000]) for i in range(0, self.xte.shape[0], 1000)])
            test_loss = float(nn.functional.cross_entropy(out, self.yte))
            test_acc = float((out.argmax(1) == self.yte).float().mean())
        times = sorted(self.step_times)
        rec = {"epoch": epoch, "train_loss": self.loss_sum / self.n, "test_loss": test_loss, "test_accuracy": test_acc,
               "epoch_seconds": seconds, "wall_seconds": self.wall, "step_ms_median": 1e3 * times[len(times) // 2]}
        if self.is_ep:
            rec["nudged_steps_mean"] = self.settle_steps / self.n
        return rec


class _Log(Observer):
    def __init__(self, name: str, epochs: int, log):
        self.name, self.epochs, self.log = name, epochs, log

    def on_epoch(self, epoch, rec, history) -> None:
        self.log(f"{self.name:14s} epoch {epoch}/{self.epochs}: test acc {rec['test_accuracy']:.4f} "
                 f"loss {rec['train_loss']:.4f} ({rec['epoch_seconds']:.1f}s)")


def train_one(name: str, cfg: BenchConfig, model0: nn.Sequential, data, log=print) -> dict:
    """Train baseline ``name`` from ``model0``'s weights with the training loop of
    :func:`mep_hw.train.fit` (same shuffles for every baseline)."""
    xtr, ytr, xte, yte = data
    kw = dict(cfg.optimizers.get(name, {}))
    trainer = _SequentialTrainer(name, cfg, copy.deepcopy(model0), kw, -(-xtr.shape[0] // cfg.batch_size), (xte, yte))
    history = fit(trainer, xtr, ytr, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                  observers=[_Log(name, cfg.epochs, log)], progress=False)
    return {"baseline": name, "mode": "ep" if trainer.is_ep else "backprop", "kwargs": kw, "history": history,
            "test_accuracy": history[-1]["test_accuracy"], "best_test_accuracy": max(h["test_accuracy"] for h in history),
            "wall_seconds": trainer.wall, "step_ms_median": sorted(h["step_ms_median"] for h in history)[len(history) // 2]}


def write_report(cfg: BenchConfig, results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bp = results.get("muon_backprop") or results.get("adam") or results.get("sgd")
    lines = [
        f"# {cfg.name}: {cfg.dataset}, {cfg.model}, {cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.schedule} schedule",
        "",
        "| optimizer | mode | final test acc | best test acc | train loss | wall time (s) | step (ms, median) | step ÷ backprop step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ratio = f"{r['step_ms_median'] / bp['step_ms_median']:.2f}" if bp else "–"
        lines.append(
            f"| {name} | {r['mode']} | {100 * r['test_accuracy']:.2f} % | {100 * r['best_test_accuracy']:.2f} % | "
            f"{r['history'][-1]['train_loss']:.4f} | {r['wall_seconds']:.1f} | {r['step_ms_median']:.2f} | {ratio} |"
        )
    if bp:
        lines += ["", f"Step-time ratios are against `{bp['baseline']}` in the same run."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for name, r in results.items():
        h = r["history"]
        ep = [x["epoch"] for x in h]
        wt = [x["wall_seconds"] for x in h]
        style = "-" if r["mode"] == "ep" else "--"
        axes[0, 0].plot(ep, [100 * x["test_accuracy"] for x in h], style, marker="o", label=name)
        axes[0, 1].plot(wt, [100 * x["test_accuracy"] for x in h], style, marker="o", label=name)
        axes[1, 0].plot(ep, [x["train_loss"] for x in h], style, marker="o", label=name)
        axes[1, 1].plot(wt, [x["train_loss"] for x in h], style, marker="o", label=name)
    for ax, (xl, yl) in zip(axes.flat, [("epoch", "test accuracy (%)"), ("wall time (s)", "test accuracy (%)"),
                                        ("epoch", "training loss (cross-entropy)"), ("wall time (s)", "training loss (cross-entropy)")]):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        if "loss" in yl:
            ax.set_yscale("log")
    axes[0, 0].legend(title="solid: EP, dashed: backprop")
    fig.suptitle(f"{cfg.name}: {cfg.dataset}, batch {cfg.batch_size}")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def run(cfg: BenchConfig, baselines, out: Path, data_dir=None, log=print) -> dict:
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ConfigError(f"unknown baseline(s) {', '.join(bad)}; valid: {', '.join(BASELINES)}")
    xtr, ytr, xte, yte, shape = _tensors(cfg, data_dir)
    model0 = build_model(cfg.model, (1, *shape), cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in baselines:
        results[name] = train_one(name, cfg, model0, (xtr, ytr, xte, yte), log)
        write_json(out / f"{name}.json", results[name])
    report = {"config": cfg.__dict__, "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}
    write_json(out / "results.json", report)
    write_report(cfg, results, out)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mep_hw.benchmarks.runner", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML file, or a shipped config name: mnist_mlp, mnist_cnn")
    p.add_argument("--baselines", nargs="+", default=["smep", "sdmep", "sgd", "adam", "muon_backprop"], choices=BASELINES,
                   help="optimizers to compare")
    p.add_argument("--output", required=True, help="folder for the JSON logs, summary.md and curves.png")
    p.add_argument("--data-dir", default=None, help="folder with the IDX files (overrides the config)")
    p.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    p.add_argument("--limit-train", type=int, default=None, help="override the config's limit_train")
    p.add_argument("--limit-test", type=int, default=None, help="override the config's limit_test")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config)
        over = {k: v for k, v in (("epochs", a.epochs), ("limit_train", a.limit_train), ("limit_test", a.limit_test)) if v is not None}
        if over:
            cfg = BenchConfig(**{**cfg.__dict__, **over})
        run(cfg, a.baselines, Path(a.output), a.data_dir)
    except MepHwError as e:
        print(f"runner: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.output}/summary.md, results.json, curves.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

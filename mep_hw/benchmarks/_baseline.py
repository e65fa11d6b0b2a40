"""What the benchmarks share: the backprop baselines' optimizer (what a training run's host
optimizer does, as the cheapest correct PyTorch implementation: torch's fused Adam, plain SGD;
Muon and Dion from the optimizer API, with the run's cosine schedule) and the ``--set
FIELD=VALUE`` training-config overrides."""

from __future__ import annotations

import statistics

import torch

from mep_hw.errors import ConfigError
from mep_hw.hw.cards import parse_value
from mep_hw.optimizers import host_optimizer

__all__ = ["baseline_optimizer", "config_sets", "ep_vs_backprop"]


def config_sets(items) -> dict:
    """``["field=value", …]`` → {field: value} (values parsed as in a card or config file),
    checked against :class:`~mep_hw.train.TrainConfig` before any run starts."""
    from mep_hw.train import TrainConfig

    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set torch_device=cuda")
        out[key.strip()] = parse_value(value.strip())
    TrainConfig.from_dict(dict(out), source="--set")  # an unknown field or a bad value fails here
    return out


def baseline_optimizer(cfg, params, steps_total: int):
    """(optimizer, scheduler or None) for ``cfg.optimizer``, ``cfg.lr``, ``cfg.schedule``."""
    params = list(params)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = host_optimizer(cfg.optimizer, params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps_total)) if cfg.schedule == "cosine" else None
    return opt, sched


def ep_vs_backprop(hist, ep_times, bp_accuracy, bp_times) -> dict:
    """The sections an interleaved EP-vs-backprop benchmark reports: the EP run's per-epoch
    history (``hist``: the run's epoch records) with its epoch times, the backprop twin's test
    accuracy and epoch times, and their time ratio (median over epochs, and per epoch)."""
    med = statistics.median
    return {
        "ep": {
            "test_accuracy": hist[-1].test_accuracy,
            "best_test_accuracy": max(h.test_accuracy for h in hist),
            "test_accuracy_history": [h.test_accuracy for h in hist],
            "train_accuracy_history": [h.train_accuracy for h in hist],
            "epoch_seconds": list(ep_times),
            "epoch_seconds_median": med(ep_times),
            "free_steps_mean": [h.free_steps_mean for h in hist],
            "nudged_steps_mean": [h.nudged_steps_mean for h in hist],  # per sample and nudged phase
            "nudged_step_limit_frac": [h.nudged_step_limit_frac for h in hist],
        },
        "backprop": {
            "test_accuracy": bp_accuracy[-1],
            "test_accuracy_history": list(bp_accuracy),
            "epoch_seconds": list(bp_times),
            "epoch_seconds_median": med(bp_times),
        },
        "ep_over_backprop_epoch_time": med(ep_times) / med(bp_times),
        "ep_over_backprop_epoch_time_per_epoch": [a / b for a, b in zip(ep_times, bp_times)],
    }

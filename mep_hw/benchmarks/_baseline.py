"""The backprop baselines' optimizer: what a training run's host optimizer does, as the cheapest
correct PyTorch implementation (torch's fused Adam, plain SGD; Muon and Dion from the optimizer
API), with the run's cosine schedule."""

from __future__ import annotations

import torch

from mep_hw.optimizers import host_optimizer

__all__ = ["baseline_optimizer"]


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

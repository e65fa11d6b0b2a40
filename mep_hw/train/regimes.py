"""Update regimes: how an EP estimate becomes a change of the weights the store holds.

* :class:`HostUpdate` (``--update host``, the default): the EP contrast, formed on the digital
  host, goes into ``.grad``; the host optimizer (Adam, SGD, Muon, Dion) computes the intended
  change and writes it through the store's single write path (``store.writer``); on a device
  store error feedback keeps intended − achieved for the next step (mixed-precision training,
  Nandakumar et al., Front. Neurosci. 2020), and the coupled spectral constraint is checked on
  what the store holds.

A regime has ``apply(result)`` (one EP result → one update), ``host_flops(batch)`` (the host's
arithmetic of one step, for cost accounting), ``lr`` and ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

import torch

from mep_hw.ep import EPResult, assign_grads
from mep_hw.host.flops import ep_estimate_flops, host_step_flops
from mep_hw.optimizers import host_optimizer

__all__ = ["HostUpdate"]


class HostUpdate:
    """The host regime (see the module docstring)."""

    name = "host"

    def __init__(self, model, cfg, steps_total: int):
        store = model.store
        self.params = model.param_list()
        coupled = None
        if cfg.spectral_gamma is not None and model.n_states > 1:
            coupled = list(model.weights)[1 : model.n_states]
        self.optimizer = host_optimizer(
            cfg.optimizer, self.params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            writer=None if store.exact else store.writer, error_feedback=not store.exact, coupled=coupled, coupled_gamma=cfg.spectral_gamma,
        )
        self.scheduler = None
        if cfg.schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, steps_total))
        self._shapes = [tuple(w.shape) for w in model.weights]
        self._step_flops = host_step_flops(cfg.optimizer, self._shapes, [b.numel() for b in model.biases])

    def apply(self, res: EPResult) -> None:
        assign_grads(self.params, res.grads)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def host_flops(self, batch: int) -> int:
        """The EP estimate (outer products of both phases) and the optimizer step."""
        return ep_estimate_flops(batch, self._shapes) + self._step_flops

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, d: dict) -> None:
        self.optimizer.load_state_dict(d["optimizer"])
        if self.scheduler is not None and d.get("scheduler") is not None:
            self.scheduler.load_state_dict(d["scheduler"])

"""The host optimizer of a training run (``mep-hw train --optimizer``), built on the
:class:`~mep_hw.optimizers.SMEPOptimizer` update pipeline so that every step is written through
one ``writer`` (a weight store's write path), with error feedback and the coupled spectral
constraint in that pipeline, once.

========  =======================================================================================
adam      Adam on every parameter at ``lr`` (Kingma & Ba 2015), L2 weight decay (as torch.optim.Adam)
sgd       heavy-ball momentum on every parameter at ``lr``, L2 weight decay (as torch.optim.SGD)
muon      Muon on the matrices at ``lr``, Adam at lr/10 on the biases, momentum 0.95, decoupled decay
dion      Dion on matrices above 1e5 entries, Muon on the other matrices, Adam on the biases
========  =======================================================================================
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor

from mep_hw.errors import ConfigError
from mep_hw.optimizers.smep import SDMEPOptimizer, SMEPOptimizer

__all__ = ["HOST_OPTIMIZERS", "host_optimizer"]

HOST_OPTIMIZERS = ("adam", "sgd", "muon", "dion")


def host_optimizer(
    name: str,
    params: Sequence[Tensor],
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    writer: Callable[[Tensor, Tensor], Tensor] | None = None,
    weight_bound: Callable[[Tensor], float | None] | None = None,
    error_feedback: bool = False,
    coupled: Sequence[Tensor] | None = None,
    coupled_gamma: float | None = None,
) -> SMEPOptimizer:
    """The optimizer ``name`` (see the module docstring) over ``params``; the EP (or backprop)
    gradient arrives in ``.grad``."""
    common = dict(mode="backprop", lr=lr, weight_decay=weight_decay, writer=writer, weight_bound=weight_bound,
                  use_error_feedback=error_feedback,
                  coupled=coupled, coupled_gamma=coupled_gamma)
    if name == "adam":
        return SMEPOptimizer(params, matrix_update="adam", other_update="adam", other_lr_scale=1.0,
                             weight_decay_mode="l2", **common)
    if name == "sgd":
        return SMEPOptimizer(params, matrix_update="momentum", other_update="momentum", other_lr_scale=1.0,
                             momentum=momentum, weight_decay_mode="l2", **common)
    if name == "muon":
        return SMEPOptimizer(params, **common)
    if name == "dion":
        return SDMEPOptimizer(params, **common)
    raise ConfigError(f"unknown host optimizer {name!r}; valid: {', '.join(HOST_OPTIMIZERS)}")

"""Equilibrium-propagation gradient estimators.

EP theorem (Scellier & Bengio 2017): for the free fixed point s⁰ and the loss L(θ) = C(s⁰(θ)),
dL/dθ = d/dβ|_{β=0} ∂F/∂θ(s^β, β), where s^β is the fixed point of F = E + βC. The estimators
take finite differences in β of the local, Hebbian quantity ∂F/∂θ:

* one-sided (Scellier & Bengio 2017): [∂F/∂θ(s^β, β) − ∂F/∂θ(s⁰, 0)] / β, bias O(β);
  with ``random_sign`` the sign of β is drawn per batch, which cancels the bias on average;
* symmetric (Laborieux et al. 2021): [∂F/∂θ(s^β, β) − ∂F/∂θ(s^{−β}, −β)] / 2β, bias O(β²).

Both nudged phases start warm from the free state. Gradients are returned in the order of
``model.param_list()`` and can be written into ``.grad`` so any host optimizer can step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from mep_hw.errors import ConfigError, SettleError
from mep_hw.settle import SettleConfig, SettleResult, SettleStatus, settle

__all__ = ["ESTIMATORS", "INITS", "EPConfig", "EPResult", "ep_gradients", "free_phase", "assign_grads"]

ESTIMATORS = ("one-sided", "symmetric")
INITS = ("forward", "zeros")


@dataclass(frozen=True, kw_only=True)
class EPConfig:
    """β, the estimator, and how the free and nudged phases settle."""

    beta: float = 0.5
    estimator: str = "symmetric"
    random_sign: bool = False
    init: str = "forward"
    free: SettleConfig = field(default_factory=SettleConfig)
    nudged: SettleConfig = field(default_factory=SettleConfig)
    strict: bool = False  # raise when a sample ends at the step limit (non-finite always raises)

    def __post_init__(self):
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(
                f"beta={self.beta!r} must be a finite number > 0 (the nudging strength; the "
                "symmetric estimator uses ±beta itself)"
            )
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"unknown estimator {self.estimator!r}; valid estimators: {', '.join(ESTIMATORS)}")
        if self.init not in INITS:
            raise ConfigError(f"unknown init {self.init!r}; valid inits: {', '.join(INITS)}")


class EPResult(NamedTuple):
    grads: list[Tensor]  # in the order of model.param_list()
    free: SettleResult
    nudged: tuple[SettleResult, ...]
    loss: Tensor  # C at the free state, per sample
    logits: Tensor  # network output at the free state


def _check(res: SettleResult, phase: str, strict: bool, check: bool = True) -> None:
    """Raise if a sample ended non-finite (or, with ``strict``, at the step limit): reads the
    statuses on the host, so it is skipped when ``check`` is False (unless ``strict``)."""
    if not (check or strict):
        return
    if (strict and not res.converged) or (res.status == SettleStatus.NONFINITE).any():
        raise SettleError(f"{phase} phase: {res.message}", res)


def _rows(res: SettleResult, sl: slice) -> SettleResult:
    return SettleResult(
        tuple(t[sl] for t in res.states), res.status[sl], res.steps[sl], res.residual[sl], res.time[sl], res.nfev
    )


def _free(model, x: Tensor, cfg: EPConfig, check: bool, dynamics_kw=None, check_result: bool = True):
    dyn = model.dynamics(x, check=check, **(dynamics_kw or {}))
    init = model.forward_init(dyn) if cfg.init == "forward" else model.zero_init(x)
    res = settle(dyn, init, cfg.free, throw=False)
    _check(res, "free", cfg.strict, check_result)
    return dyn, res


def free_phase(model, x: Tensor, cfg: EPConfig, *, check: bool = True, dynamics_kw=None) -> SettleResult:
    """Settle the free phase (β = 0) from the configured initial state. ``dynamics_kw`` go to
    ``model.dynamics`` (e.g. the device tiles the weights are read through)."""
    return _free(model, x, cfg, check, dynamics_kw)[1]


@torch.no_grad()
def ep_gradients(
    model,
    x: Tensor,
    target: Tensor,
    cfg: EPConfig,
    *,
    generator: torch.Generator | None = None,
    free_states: Sequence[Tensor] | None = None,
    contrast=None,
    dynamics_kw: dict | None = None,
    check: bool = True,
) -> EPResult:
    """Free phase, nudged phase(s) and the EP estimate of dL/dθ for one batch.

    ``model`` is an energy: a :class:`~mep_hw.model.LayeredHopfield` or a
    :class:`~mep_hw.model.FeedforwardEnergy`. The two phases of the symmetric estimator settle
    together as one batch of 2B samples with β = (+β, …, −β, …), both warm-started from the free
    state. ``free_states``, if given, is the exact free fixed point (the forward pass of a
    feedforward energy, already run): it is used as is, with no free settle. ``contrast`` replaces
    ``model.ep_contrast`` (same signature), e.g. by a layer-local computation. ``dynamics_kw``
    go to ``model.dynamics`` (e.g. ``ops``: the device tiles the weights are read through).

    ``check=False`` skips the per-batch checks that read tensors on the host (the finiteness of
    ``x`` and ``target``, and the non-finite statuses of the settles, which would otherwise raise
    SettleError here): a training loop validates its data once and reads the non-finite counts
    that :func:`mep_hw.train.tracing.batch_sums` accumulates on the device when it reads its
    sums (once per epoch or trace interval). ``cfg.strict`` still raises at once.
    """
    contrast = contrast or model.ep_contrast
    if check:
        model.check_batch(x, target)
    if free_states is None:
        dyn, free = _free(model, x, cfg, check=False, dynamics_kw=dynamics_kw, check_result=check)
    else:  # an exact fixed point by construction (a forward pass): nothing to settle
        dyn = model.dynamics(x, check=False, free_states=free_states, **(dynamics_kw or {}))
        B = free_states[0].shape[0]
        zeros = free_states[0].new_zeros(B)
        free = SettleResult(tuple(free_states), torch.zeros(B, dtype=torch.int8, device=zeros.device),
                            torch.zeros(B, dtype=torch.int64, device=zeros.device), zeros, zeros, 0)
    s0 = free.states
    B = x.shape[0]
    beta = float(cfg.beta)
    if cfg.estimator == "symmetric":
        col = torch.cat([x.new_full((B, 1), beta), x.new_full((B, 1), -beta)])
        res = settle(dyn.nudge(col, torch.cat([target, target])), [torch.cat([t, t]) for t in s0],
                     cfg.nudged, throw=False)
        _check(res, f"nudged (beta=±{beta:g})", cfg.strict, check)
        nudged = (_rows(res, slice(0, B)), _rows(res, slice(B, 2 * B)))
        grads = contrast(x, nudged[0].states, beta, nudged[1].states, -beta, target)
    else:
        sign = 1.0
        if cfg.random_sign:
            sign = 1.0 if torch.rand((), generator=generator).item() < 0.5 else -1.0
        b = sign * beta
        res = settle(dyn.nudge(b, target), s0, cfg.nudged, throw=False)
        _check(res, f"nudged (beta={b:+g})", cfg.strict, check)
        nudged = (res,)
        grads = contrast(x, res.states, b, s0, 0.0, target)
    return EPResult(grads, free, nudged, model.cost_fn(s0, target), model.logits(s0))


def assign_grads(params: Sequence[torch.nn.Parameter], grads: Sequence[Tensor]) -> None:
    """Write EP estimates into ``.grad`` (replacing what is there)."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g.to(p.dtype)

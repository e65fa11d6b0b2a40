"""Equilibrium-propagation gradient estimators.

EP theorem (Scellier & Bengio 2017): for the free fixed point s⁰ and the loss L(θ) = C(s⁰(θ)),
dL/dθ = d/dβ|_{β=0} ∂F/∂θ(s^β, β), where s^β is the fixed point of F = E + βC. The estimators
take finite differences in β of the local, Hebbian quantity ∂F/∂θ:

* one-sided (Scellier & Bengio 2017): [∂F/∂θ(s^β, β) − ∂F/∂θ(s⁰, 0)] / β, bias O(β);
  with ``random_sign`` the sign of β is drawn per batch, which cancels the bias on average;
* symmetric (Laborieux et al. 2021): [∂F/∂θ(s^β, β) − ∂F/∂θ(s^{−β}, −β)] / 2β, bias O(β²);
* holomorphic (Laborieux & Zenke 2022): N nudged phases at β_k = |β|e^{2πik/N} on a circle, and
  Cauchy's integral formula for the derivative, d/dβ|₀ g = (1/2πi)∮ g(β)/β² dβ, by the N-point
  trapezoid rule: (1/N) Σ_k [∂F/∂θ(s^{β_k}, β_k) − ∂F/∂θ(s⁰, 0)] / β_k. For g analytic,
  g(β) = Σ_m a_m β^m, the rule returns a_1 + a_{N+1}|β|^N + …: bias O(|β|^N). N = 2 is the
  symmetric estimator. The complex phases need a holomorphic field (see
  :mod:`mep_hw.model.holomorphic`); for real x, y and θ, g(β̄) = conj g(β), so only the phases
  with Im β_k ≥ 0 are settled (the real ones, |β| and for even N −|β|, in real arithmetic) and
  each complex one counts twice through its real part.

Both nudged phases start warm from the free state. Gradients are returned in the order of
``model.param_list()`` and can be written into ``.grad`` so any host optimizer can step.
"""

from __future__ import annotations

import cmath
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from mep_hw.errors import ConfigError, SettleError
from mep_hw.model.holomorphic import check_holomorphic, complex_dtype
from mep_hw.settle import SettleConfig, SettleResult, SettleStatus, settle

__all__ = ["ESTIMATORS", "INITS", "EPConfig", "EPResult", "ep_gradients", "free_phase", "assign_grads"]

ESTIMATORS = ("one-sided", "symmetric", "holomorphic")
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
    points: int = 4  # holomorphic estimator: N, the number of β on the circle (bias O(|β|^N))

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
        if isinstance(self.points, bool) or not isinstance(self.points, int) or self.points < 2:
            raise ConfigError(
                f"points={self.points!r} must be an integer ≥ 2 (the holomorphic estimator's number of β on the "
                "circle; N = 2 is the symmetric estimator, N = 1 would be the one-sided one)"
            )
        if self.estimator == "holomorphic":
            sc = self.nudged
            if sc.get_backend() is not None or sc.get_tableau().adaptive:
                raise ConfigError(
                    f"the holomorphic estimator settles complex states, which the nudged-phase solver "
                    f"{sc.solver!r} does not support; use a fixed-step solver (euler, rk4, …)"
                )


class EPResult(NamedTuple):
    grads: list[Tensor]  # in the order of model.param_list()
    free: SettleResult
    nudged: tuple[SettleResult, ...]
    loss: Tensor  # C at the free state, per sample
    logits: Tensor  # network output at the free state
    # the two phases the estimate contrasts, (states, β) each, β_a > β_b: what an in-array update
    # applies (the a phase potentiates, the b phase depresses, scaled by 1 / (β_a − β_b))
    phases: tuple = ()


def _check(res: SettleResult, phase: str, strict: bool) -> None:
    if (res.status == SettleStatus.NONFINITE).any() or (strict and not res.converged):
        raise SettleError(f"{phase} phase: {res.message}", res)


def _rows(res: SettleResult, sl: slice) -> SettleResult:
    return SettleResult(
        tuple(t[sl] for t in res.states), res.status[sl], res.steps[sl], res.residual[sl], res.time[sl], res.nfev
    )


def _free(model, x: Tensor, cfg: EPConfig, check: bool):
    dyn = model.dynamics(x, check=check)
    init = model.forward_init(dyn) if cfg.init == "forward" else model.zero_init(x)
    res = settle(dyn, init, cfg.free, throw=False)
    _check(res, "free", cfg.strict)
    return dyn, res


def free_phase(model, x: Tensor, cfg: EPConfig, *, check: bool = True) -> SettleResult:
    """Settle the free phase (β = 0) from the configured initial state (the model reads its
    weights through its store)."""
    return _free(model, x, cfg, check)[1]


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
) -> EPResult:
    """Free phase, nudged phase(s) and the EP estimate of dL/dθ for one batch.

    ``model`` is an energy: a :class:`~mep_hw.model.LayeredHopfield` or a
    :class:`~mep_hw.model.FeedforwardEnergy`. The two phases of the symmetric estimator settle
    together as one batch of 2B samples with β = (+β, …, −β, …), both warm-started from the free
    state. ``free_states``, if given, is the exact free fixed point (the forward pass of a
    feedforward energy, already run): it is used as is, with no free settle. ``contrast`` replaces
    ``model.ep_contrast`` (same signature), e.g. by a layer-local computation. The model reads
    its weights through its store (exact, or device tiles).
    """
    contrast = contrast or model.ep_contrast
    if cfg.estimator == "holomorphic":
        check_holomorphic(model)  # before any settle: the complex phases need a holomorphic field
    model.check_batch(x, target)
    if free_states is None:
        dyn, free = _free(model, x, cfg, check=False)
    else:  # an exact fixed point by construction (a forward pass): nothing to settle
        dyn = model.dynamics(x, check=False, free_states=free_states)
        B = free_states[0].shape[0]
        zeros = free_states[0].new_zeros(B)
        free = SettleResult(tuple(free_states), torch.zeros(B, dtype=torch.int8, device=zeros.device),
                            torch.zeros(B, dtype=torch.int64, device=zeros.device), zeros, zeros, 0)
    s0 = free.states
    B = x.shape[0]
    beta = float(cfg.beta)
    if cfg.estimator == "holomorphic":
        grads, nudged = _holomorphic(model, dyn, x, target, s0, cfg, contrast)
        phases = ()  # complex phases: no in-array counterpart
    elif cfg.estimator == "symmetric":
        col = torch.cat([x.new_full((B, 1), beta), x.new_full((B, 1), -beta)])
        res = settle(dyn.nudge(col, torch.cat([target, target])), [torch.cat([t, t]) for t in s0],
                     cfg.nudged, throw=False)
        _check(res, f"nudged (beta=±{beta:g})", cfg.strict)
        nudged = (_rows(res, slice(0, B)), _rows(res, slice(B, 2 * B)))
        grads = contrast(x, nudged[0].states, beta, nudged[1].states, -beta, target)
        phases = ((nudged[0].states, beta), (nudged[1].states, -beta))
    else:
        sign = 1.0
        if cfg.random_sign:
            sign = 1.0 if torch.rand((), generator=generator).item() < 0.5 else -1.0
        b = sign * beta
        res = settle(dyn.nudge(b, target), s0, cfg.nudged, throw=False)
        _check(res, f"nudged (beta={b:+g})", cfg.strict)
        nudged = (res,)
        grads = contrast(x, res.states, b, s0, 0.0, target)
        phases = ((res.states, b), (s0, 0.0)) if b > 0 else ((s0, 0.0), (res.states, b))
    return EPResult(grads, free, nudged, model.cost_fn(s0, target), model.logits(s0), phases)


def _holomorphic(model, dyn, x: Tensor, target: Tensor, s0, cfg: EPConfig, contrast):
    """The N-point holomorphic estimate (see the module docstring): the real phases settle as
    one real batch, the complex ones (Im β > 0) as one complex batch; each phase's one-sided
    contrast [∂F/∂θ(s^{β_k}) − ∂F/∂θ(s⁰)]/β_k is averaged, complex ones as 2·Re."""
    N, r, B = cfg.points, float(cfg.beta), x.shape[0]
    real_betas = [r] + ([-r] if N % 2 == 0 else [])
    cplx_betas = [r * cmath.exp(2j * math.pi * k / N) for k in range(1, (N + 1) // 2)]
    acc: list[Tensor] | None = None
    nudged: list[SettleResult] = []

    def add(grads, weight: float) -> None:
        nonlocal acc
        parts = [(g.real if g.is_complex() else g) * (weight / N) for g in grads]
        acc = parts if acc is None else [a.add_(p) for a, p in zip(acc, parts)]

    n = len(real_betas)
    col = torch.cat([x.new_full((B, 1), b) for b in real_betas])
    res = settle(dyn.nudge(col, target.repeat(n, 1)), [t.repeat(n, 1) for t in s0], cfg.nudged, throw=False)
    _check(res, f"nudged (beta={', '.join(f'{b:+g}' for b in real_betas)})", cfg.strict)
    for i, b in enumerate(real_betas):
        part = _rows(res, slice(i * B, (i + 1) * B))
        nudged.append(part)
        add(contrast(x, part.states, b, s0, 0.0, target), 1.0)
    if cplx_betas:
        cdt = complex_dtype(x.dtype)
        # device tiles: a complex read is two real reads (exact weights read complex inputs as is)
        cdyn = dyn if model.store.exact else model.dynamics(x, check=False, complex_reads=True)
        m = len(cplx_betas)
        col = torch.tensor(cplx_betas, dtype=cdt, device=x.device).repeat_interleave(B).unsqueeze(1)
        s0c = [t.to(cdt) for t in s0]
        res = settle(cdyn.nudge(col, target.repeat(m, 1)), [t.repeat(m, 1) for t in s0c], cfg.nudged, throw=False)
        res = res._replace(time=res.time.real if res.time.is_complex() else res.time)
        _check(res, f"nudged (|beta|={r:g}, complex)", cfg.strict)
        xc, yc = x.to(cdt), target.to(cdt)
        for i, b in enumerate(cplx_betas):
            part = _rows(res, slice(i * B, (i + 1) * B))
            nudged.append(part)
            add(contrast(xc, part.states, b, s0c, 0.0, yc), 2.0)
    return acc, tuple(nudged)


def assign_grads(params: Sequence[torch.nn.Parameter], grads: Sequence[Tensor]) -> None:
    """Write EP estimates into ``.grad`` (replacing what is there)."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g.to(p.dtype)

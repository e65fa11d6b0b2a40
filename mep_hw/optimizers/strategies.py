"""Strategy classes of the MEP optimizer API. Each is usable alone and composes with the others:

* gradient sources: :class:`EPGradient`, :class:`LocalEPGradient` (write EP estimates into ``.grad``);
* preconditioner: :class:`NaturalGradient` (input-side Fisher whitening);
* update rules: :class:`MuonUpdate`, :class:`DionUpdate`, :class:`AdamUpdate`, :class:`MomentumUpdate`;
* after the step: :class:`SpectralConstraint`, :class:`ErrorFeedback`.

Update rules and the preconditioner keep their state in a per-parameter dict (the optimizer's
``state[p]``), so ``state_dict``/``load_state_dict`` carry it. The math lives in
:mod:`mep_hw.host` and :mod:`mep_hw.ep`; these classes only hold hyperparameters and state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from mep_hw.ep import EPConfig, EPResult, assign_grads, ep_gradients
from mep_hw.errors import ConfigError, SettleError
from mep_hw.host import (
    adam_direction,
    as_matrix,
    coupled_spectral_norm,
    dion_direction,
    dion_scale,
    muon_direction,
    muon_scale,
    ns5_max,
    spectral_norm,
    whiten,
)

_NS5_MAX = ns5_max()
from mep_hw.model import FeedforwardEnergy
from mep_hw.model.sequential import SETTLE_FLOWS
from mep_hw.settle import SettleConfig, SettleStatus, settle

# default step limit of a nudged settle per flow (EPGradient.settle_steps=None). The local flow's
# 300 (measured by mep_hw.benchmarks.settle_flows, docs/optimizers.md): after 100 smep steps on
# the MNIST MLP, 100 steps leave 8 % of the samples unsettled (11.6 % over a training epoch) and
# 300 none, for 1.2x the time; on the trained CNN 5 % and none (cosine with backprop's gradient
# 0.9923 and 0.9966), for 1.75x
SETTLE_STEPS = {"newton": 20, "local": 300}

__all__ = [
    "settle_safe_gamma", "reflected_symmetric", "SETTLE_STEPS",
    "EPGradient", "LocalEPGradient", "NaturalGradient", "MuonUpdate", "DionUpdate", "AdamUpdate",
    "MomentumUpdate", "SpectralConstraint", "ErrorFeedback",
]


def _check(name, v, lo=0.0, hi=math.inf, lo_open=False, hi_open=False):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ConfigError(f"{name}={v!r} must be a number in {lb}{lo}, {hi}{rb}")


# ----------------------------------------------------------------------------- gradient sources
@dataclass(frozen=True, kw_only=True)
class EPGradient:
    """EP estimate of dL/dθ written into ``.grad``: free phase (the forward pass), nudged
    phase(s) settled by :func:`mep_hw.settle.settle`, contrast of ∂F/∂θ.

    ``settle`` picks the flow of the nudged phases (:class:`~mep_hw.model.FeedforwardEnergy`):
    ``'newton'`` (default) is a backprop-equivalent Newton flow — every step sweeps ∂C/∂s_L back
    through all blocks, so it is not local — that converges in a few steps; ``'local'`` is the
    gradient flow of F with per-layer time constants, each layer driven by its own error and its
    upper neighbour's error through that block's Jacobian-transpose (the relaxation of
    predictive coding / EP), tens to hundreds of steps.

    ``reflect`` (symmetric estimator): settle +β first, then −β from the reflection
    2s⁰ − s^{+β} (each unit's own two stored states), which is O(β²) from its fixed point
    instead of O(β): about half the −β steps per sample (the physical settle time of a device
    that runs the phases one after the other), but more wall time in simulation, where both
    phases otherwise settle as one batch and the slowest samples set the step count
    (docs/optimizers.md).

    ``settle_steps`` bounds each nudged settle (default: :data:`SETTLE_STEPS` of the flow),
    ``settle_lr`` is its Euler step (in units of τ), ``settle_tol`` its absolute steady-state
    tolerance on rms(ds/dt).
    """

    beta: float = 0.1
    estimator: str = "symmetric"
    settle_steps: int | None = None
    settle_lr: float = 1.0
    settle_tol: float = 1e-5
    loss_type: str = "cross_entropy"
    settle: str = "newton"
    reflect: bool = False

    def config(self) -> EPConfig:
        if self.settle not in SETTLE_FLOWS:
            raise ConfigError(
                f"unknown settle {self.settle!r}; valid: {', '.join(SETTLE_FLOWS)} ('newton': a "
                "backprop-equivalent Newton flow, a few steps; 'local': the gradient flow of F, each layer "
                "driven by its neighbours only, tens to hundreds of steps)"
            )
        steps = SETTLE_STEPS[self.settle] if self.settle_steps is None else self.settle_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"settle_steps={steps!r} must be an integer ≥ 1 (or None: {SETTLE_STEPS})")
        _check("settle_lr", self.settle_lr, lo=0.0, lo_open=True)
        if not isinstance(self.reflect, bool):
            raise ConfigError(f"reflect={self.reflect!r} must be true or false")
        nudged = SettleConfig(solver="euler", dt=float(self.settle_lr), atol=self.settle_tol, rtol=0.0, max_steps=steps)
        free = SettleConfig(solver="euler", dt=float(self.settle_lr), atol=self.settle_tol, rtol=0.0, max_steps=1)
        return EPConfig(beta=self.beta, estimator=self.estimator, init="forward", free=free, nudged=nudged)

    def energy(self, model: nn.Module) -> FeedforwardEnergy:
        return FeedforwardEnergy(model, self.loss_type, settle=self.settle)

    def _contrast(self, energy):
        return energy.ep_contrast

    def compute(self, energy: FeedforwardEnergy, x: Tensor, target: Tensor, free_states=None) -> EPResult:
        """Settle, estimate and assign ``.grad`` of the energy's parameters; returns the result."""
        cfg = self.config()
        if self.reflect and cfg.estimator == "symmetric":
            res = reflected_symmetric(energy, x, target, cfg, free_states, self._contrast(energy))
        else:
            res = ep_gradients(energy, x, target, cfg, free_states=free_states, contrast=self._contrast(energy))
        assign_grads(energy.param_list(), res.grads)
        return res


@torch.no_grad()
def reflected_symmetric(energy: FeedforwardEnergy, x: Tensor, target: Tensor, cfg: EPConfig, free_states, contrast) -> EPResult:
    """The symmetric EP estimate with the two nudged phases settled one after the other: +β
    from the free state s⁰, then −β from the reflection 2s⁰ − s^{+β}. Since
    s^{±β} = s⁰ ± βs' + ½β²s'' + O(β³), the reflection is within β²‖s''‖ of s^{−β}, where s⁰ is
    β‖s'‖ away: the −β settle has less to travel. The fixed points, and so the estimate, are
    those of :func:`mep_hw.ep.ep_gradients` (same result type)."""
    if free_states is None:  # the forward pass is the exact free fixed point
        energy.check_batch(x, target)
        free_states = energy.forward_states(x)[1]
    res = ep_gradients(energy, x, target, dataclasses.replace(cfg, estimator="one-sided"), free_states=free_states,
                       contrast=_no_contrast)
    s0, plus = res.free.states, res.nudged[0]
    dyn = energy.dynamics(x, check=False, free_states=list(s0))
    start = [a.mul(2.0).sub_(b) for a, b in zip(s0, plus.states)]
    minus = settle(dyn.nudge(-float(cfg.beta), target), start, cfg.nudged, throw=False)
    if (minus.status == SettleStatus.NONFINITE).any():
        raise SettleError(f"nudged (beta=-{cfg.beta:g}) phase: {minus.message}", minus)
    grads = contrast(x, plus.states, float(cfg.beta), minus.states, -float(cfg.beta), target)
    return res._replace(grads=grads, nudged=(plus, minus))


def _no_contrast(x, sa, beta_a, sb, beta_b, target):
    return []


@dataclass(frozen=True, kw_only=True)
class LocalEPGradient(EPGradient):
    """EP with each layer's update computed from that layer's own pre- and post-synaptic states
    in the two phases only (:meth:`FeedforwardEnergy.local_contrast`): what a crossbar tile can
    compute with no global signal. Numerically the same estimate as :class:`EPGradient`. The
    update is local; the settle is local only with ``settle='local'``."""

    def _contrast(self, energy):
        return energy.local_contrast


# ----------------------------------------------------------------------------- preconditioner
@dataclass(frozen=True, kw_only=True)
class NaturalGradient:
    """Input-side Fisher whitening of a layer's gradient, ΔW ← ΔW (E[a aᵀ] + λI)⁻¹, with a the
    layer's input activations in the free phase (unfolded patches for Conv2d; Martens & Grosse
    2015's input factor). E[a aᵀ] is an exponential moving average (``ema``); its damped Cholesky
    factor is refreshed every ``refresh`` steps. ``damping`` λ is relative to the mean
    eigenvalue tr(A)/n, plus 1e-8 absolute."""

    damping: float = 1e-2
    ema: float = 0.95
    refresh: int = 10

    def __post_init__(self):
        _check("damping", self.damping, lo=0.0, lo_open=True)
        _check("ema", self.ema, lo=0.0, hi=1.0, hi_open=True)
        if isinstance(self.refresh, bool) or not isinstance(self.refresh, int) or self.refresh < 1:
            raise ConfigError(f"refresh={self.refresh!r} must be an integer ≥ 1")

    @staticmethod
    def inputs_of(module: nn.Module, inp: Tensor) -> Tensor:
        """The rows a whose outer products form E[a aᵀ] for ``module`` given its input."""
        if isinstance(module, nn.Conv2d):
            cols = torch.nn.functional.unfold(inp, module.kernel_size, module.dilation, module.padding, module.stride)
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return inp.reshape(inp.shape[0], -1)

    def observe(self, weight: Tensor, a: Tensor, state: dict) -> None:
        A = (a.T @ a) / a.shape[0]
        if "fisher_A" not in state:
            state["fisher_A"] = A
            state["fisher_count"] = 0
        else:
            state["fisher_A"].lerp_(A, 1.0 - self.ema)

    def precondition(self, weight: Tensor, grad: Tensor, state: dict) -> Tensor:
        if "fisher_A" not in state:
            return grad
        if state["fisher_count"] % self.refresh == 0 or "fisher_L" not in state:
            A = state["fisher_A"]
            n = A.shape[0]
            lam = self.damping * float(A.diagonal().mean()) + 1e-8
            state["fisher_L"] = torch.linalg.cholesky(A + lam * torch.eye(n, dtype=A.dtype, device=A.device))
        state["fisher_count"] += 1
        return whiten(grad, state["fisher_L"])


# ----------------------------------------------------------------------------- update rules
@dataclass(frozen=True, kw_only=True)
class MuonUpdate:
    """Momentum, then quintic Newton–Schulz orthogonalisation, times max(1, rows/cols)^½
    (Jordan et al. 2024). For 2-D weights and flattened conv filters."""

    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5

    def direction(self, p: Tensor, grad: Tensor, state: dict) -> Tensor:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        return muon_direction(grad, state["momentum_buffer"], self.momentum, self.nesterov, self.ns_steps)

    def spectral_bound(self, p: Tensor) -> float:
        """An upper bound on σ_max of the direction: the NS5 band's top times the shape factor."""
        return _NS5_MAX * muon_scale(p.shape) if self.ns_steps == 5 else math.inf


@dataclass(frozen=True, kw_only=True)
class DionUpdate:
    """Dion (Ahn et al. 2025): rank r = ⌈rank_frac · min(m, n)⌉ orthonormal updates from one
    warm-started power iteration per step, QR, and error feedback of the part of the momentum
    the rank-r step leaves out; scaled by (fan_out/fan_in)^½. Q starts from a seeded Gaussian."""

    rank_frac: float = 0.2
    mu: float = 0.95
    seed: int = 0

    def __post_init__(self):
        _check("rank_frac", self.rank_frac, lo=0.0, hi=1.0, lo_open=True)

    def rank(self, shape) -> int:
        m, n = as_matrix(torch.empty(shape, device="meta")).shape
        return max(1, math.ceil(self.rank_frac * min(m, n)))

    def direction(self, p: Tensor, grad: Tensor, state: dict) -> Tensor:
        if "momentum_buffer" not in state:
            m, n = as_matrix(grad).shape
            g = torch.Generator().manual_seed(self.seed + 7919 * (m * 131 + n))
            state["momentum_buffer"] = torch.zeros_like(grad)
            state["dion_Q"] = torch.randn(n, self.rank(grad.shape), generator=g, dtype=grad.dtype).to(grad.device)
        return dion_direction(grad, state["momentum_buffer"], state["dion_Q"], self.mu)

    def spectral_bound(self, p: Tensor) -> float:
        """σ_max(P Qᵀ) ≤ ‖P‖‖Q‖ ≤ ‖Q‖_F = √r (P orthonormal, Q's columns unit), times the scale."""
        return dion_scale(p.shape) * math.sqrt(self.rank(p.shape))


@dataclass(frozen=True, kw_only=True)
class AdamUpdate:
    """Adam with bias correction (Kingma & Ba 2015): for biases, gains and anything that is not a
    matrix."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def direction(self, p: Tensor, grad: Tensor, state: dict) -> Tensor:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
            state["adam_step"] = 0
        state["adam_step"] += 1
        return adam_direction(grad, state["exp_avg"], state["exp_avg_sq"], state["adam_step"], self.betas, self.eps)


@dataclass(frozen=True, kw_only=True)
class MomentumUpdate:
    """Heavy-ball momentum: buffer ← μ·buffer + grad; the direction is the buffer."""

    momentum: float = 0.9

    def direction(self, p: Tensor, grad: Tensor, state: dict) -> Tensor:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = grad.clone()
        else:
            state["momentum_buffer"].mul_(self.momentum).add_(grad)
        return state["momentum_buffer"].clone()

    def spectral_bound(self, p: Tensor) -> float:
        return math.inf  # no a-priori bound: the spectral constraint checks exactly


# ----------------------------------------------------------------------------- after the step
@dataclass(frozen=True, kw_only=True)
class SpectralConstraint:
    """Keeps σ_max ≤ γ after every step by rescaling, with σ from a power iteration warm-started
    at the previous singular vector and run to convergence in float64 (relative change of the
    Rayleigh estimate < ``rtol``).

    :meth:`apply` bounds each matrix (conv filters as (out, in·kh·kw)): for a feedforward
    energy this bounds each block's Lipschitz constant. :meth:`apply_coupled` bounds the
    coupling operator of a layered Hopfield network (DESIGN §3), which is what guarantees a
    unique fixed point of its settle; per-layer bounds do not (the chain of L layers with
    σ(W_l) = γ reaches 2γ cos(π/(L+1)))."""

    gamma: float = 0.95
    rtol: float = 1e-10
    max_iters: int = 1000

    def __post_init__(self):
        if not (isinstance(self.gamma, float) and math.isinf(self.gamma)):
            _check("gamma", self.gamma, lo=0.0, lo_open=True)

    @torch.no_grad()
    def apply(self, weight: Tensor, state: dict, step_bound: float | None = None) -> float:
        """Rescale ``weight`` in place so that σ_max ≤ γ; returns σ (before rescaling) or, when
        the check was skipped, the upper bound that made it unnecessary.

        ``step_bound`` bounds σ_max of the change made to ``weight`` since the last call. The
        constraint keeps an upper bound σ_ub ≥ σ_max(weight) (σ(A + B) ≤ σ(A) + σ(B)) and runs
        the power iteration only when σ_ub + step_bound > γ; without a bound it always does.
        """
        ub = state.get("spectral_ub")
        if step_bound is not None and ub is not None and ub + step_bound <= self.gamma:
            state["spectral_ub"] = ub + step_bound
            return state["spectral_ub"]
        est = spectral_norm(weight, state.get("spectral_v"), max_iters=self.max_iters, rtol=self.rtol)
        state["spectral_v"] = est.vectors[0]
        sigma = est.sigma
        if sigma > self.gamma:
            weight.mul_(self.gamma / sigma)
        # the estimate converged to rtol; the margin covers it and float rounding of the rescale
        state["spectral_ub"] = min(sigma, self.gamma) * (1.0 + 1e-6)
        return sigma

    @torch.no_grad()
    def apply_coupled(self, weights: Sequence[Tensor], state: dict, writer=None) -> float:
        """Rescale the chain ``weights`` (state k → k+1) together so that ‖𝒲‖ ≤ γ; returns σ
        measured before. With ``writer(w, delta) -> applied`` (a weight store's write path) the
        rescale is written through it, and σ is measured on what it holds."""
        est = coupled_spectral_norm([w.detach() for w in weights], state.get("coupled_v"), max_iters=self.max_iters, rtol=self.rtol)
        state["coupled_v"] = est.vectors
        if est.sigma > self.gamma:
            for w in weights:
                if writer is None:
                    w.mul_(self.gamma / est.sigma)
                else:
                    writer(w, w.detach() * (self.gamma / est.sigma - 1.0))
        return est.sigma


@functools.lru_cache(maxsize=64)
def settle_safe_gamma(beta: float, n_blocks: int, loss_type: str) -> float:
    """The largest per-block bound γ that guarantees the nudged settle of a feedforward energy
    converges: the Newton settle's error contracts by β ‖∇²C‖ ‖(I − 𝒥)⁻¹‖², and with every
    block γ-Lipschitz (1-Lipschitz activations) ‖(I − 𝒥)⁻¹‖ ≤ Σ_{k<L} γᵏ, so γ solves
    (Σ_{k<L} γᵏ)² β c = 1 with c = ½ (softmax cross-entropy) or 1 (MSE). Infinite for one block.
    The same condition keeps F's Gauss–Newton Hessian minus β∇²C positive definite (its smallest
    eigenvalue is 1/‖(I − 𝒥)⁻¹‖²), so the local settle's −β phase has a unique minimiser too.
    """
    c = 0.5 if loss_type == "cross_entropy" else 1.0
    if beta * c >= 1.0:
        raise ConfigError(
            f"beta={beta} is too large for a guaranteed settle with {loss_type} (need beta < {1 / c:g}); "
            "lower beta or give gamma as a number"
        )
    if n_blocks == 1:
        return math.inf
    target = (1.0 / (beta * c)) ** 0.5
    lo, hi = 0.0, target
    for _ in range(200):  # Σγᵏ is increasing in γ: bisect
        mid = 0.5 * (lo + hi)
        if sum(mid**k for k in range(n_blocks)) < target:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True, kw_only=True)
class ErrorFeedback:
    """Carries what was intended but not applied into the next step: the optimizer asks
    :meth:`intended` for (update + residual), writes it through its writer (exact on a float
    host; lossy on a quantised or analog store), and :meth:`record` keeps
    residual = intended − applied (Seide et al. 2014; Karimireddy et al. 2019).

    Given the weight after the write ``p`` and the largest |w| the store can hold ``bound``, the
    residual keeps only what the device can still reach: residual = clip(p + intended − applied,
    ±bound) − p. Without it a saturated weight (a device pair at its conductance limit) winds the
    residual up step after step, and when the gradient turns the weight stays pinned until the
    wound-up residual has been paid back (integrator windup)."""

    def intended(self, delta: Tensor, state: dict) -> Tensor:
        r = state.get("ef_residual")
        return delta if r is None else delta + r

    def record(self, intended: Tensor, applied: Tensor, state: dict, p: Tensor | None = None,
               bound: float | None = None) -> None:
        r = intended - applied
        if bound is not None and p is not None:
            r = (p + r).clamp_(-bound, bound).sub_(p)
        state["ef_residual"] = r

"""The settling engine: integrate ds/dt = f(s) to a steady state, per sample.

``f`` is the vector field of a *dynamics* object (for EP, the field of the layered Hopfield
network, see :mod:`mep_hw.model.hopfield`). Time is dimensionless, in units of the network's time
constant τ, so a device card can turn it into seconds. A sample stops when its steady-state test
holds (L2 norms over all of the sample's state components, N of them)::

    rms(f(s)) ≤ atol + rtol · rms(s)        with rms(v) = ‖v‖ / √N

Every dynamics declares ``noise_floor``, the rms of its field noise per component (0 for exact
weights; > 0 when read through noisy hardware); 2 × noise_floor is added to atol. A sample also stops at ``max_steps`` (status
STEP_LIMIT) or when its residual is not finite (NONFINITE). Finished samples are dropped from the working batch (in bulk, once they make up a
fraction ``compact_frac`` of it), so they stop costing work.

A solver name may also name a backend (:data:`mep_hw.settle.BACKENDS`): ``brian2`` settles the
layered Hopfield network as Brian2 rate units, with this contract
(:mod:`mep_hw.settle.brian2_backend`).

The state of all layers is packed into one tensor of shape (batch, N) (the dynamics' ``sizes``
give the layer widths), so each solver step costs a fixed number of tensor operations whatever
the depth. A dynamics object provides ``sizes``, ``box`` (``(lo, hi)`` or None: states are kept
in the box by projection), ``field(s) -> Tensor`` and ``restrict(index) -> dynamics`` (the same
dynamics on the samples selected by the integer tensor ``index``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, Protocol, Sequence

import torch
from torch import Tensor

from mep_hw.errors import ConfigError, SettleError
from mep_hw.settle.solvers import SOLVERS, Backend, Tableau, get_backend, get_solver

__all__ = ["Dynamics", "SettleConfig", "SettleResult", "SettleStatus", "settle", "integrate", "rk_step"]


class Dynamics(Protocol):
    sizes: tuple[int, ...]
    box: tuple[float, float] | None
    noise_floor: float  # rms noise of the field per state component (0: exact; taken as 0 when absent)

    def field(self, s: Tensor) -> Tensor: ...

    def restrict(self, keep: Tensor) -> "Dynamics": ...


class SettleStatus(IntEnum):
    CONVERGED = 0
    STEP_LIMIT = 1
    NONFINITE = 2

    @property
    def remedy(self) -> str:
        return _REMEDIES[self]


_REMEDIES = {
    SettleStatus.CONVERGED: "",
    SettleStatus.STEP_LIMIT: (
        "raise max_steps, loosen atol/rtol, use an adaptive solver (dopri5, bosh3), or make the "
        "dynamics contractive (bound the coupling's spectral norm below 1)"
    ),
    SettleStatus.NONFINITE: (
        "the dynamics diverged: lower dt or use an adaptive solver, lower the learning rate, or "
        "bound the weights' spectral norm (spectral constraint)"
    ),
}


def _positive(name: str, v) -> None:
    if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise ConfigError(f"{name}={v!r} must be a finite number > 0")


def _nonneg(name: str, v) -> None:
    if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise ConfigError(f"{name}={v!r} must be a finite number ≥ 0")


@dataclass(frozen=True, kw_only=True)
class SettleConfig:
    """How to settle.

    ``dt`` is the step (fixed-step solvers) or the first step (adaptive), in units of τ.
    ``atol``/``rtol`` define the steady-state test; ``max_steps`` bounds the solver steps;
    no sample stops before ``min_steps`` (on noisy hardware the test can hold at step 0 although
    a nudge has not yet reached the hidden layers).
    ``err_atol``/``err_rtol`` control the local error of adaptive solvers; ``dt_max`` caps their
    step.
    """

    solver: str = "euler"
    dt: float = 0.5
    atol: float = 1e-4
    rtol: float = 1e-3
    max_steps: int = 200
    err_atol: float = 1e-4
    err_rtol: float = 1e-3
    dt_max: float = 1.0
    min_steps: int = 0

    def __post_init__(self):
        get_backend(self.solver)  # validates the name against every solver and backend
        tab = SOLVERS.get(self.solver)
        _positive("dt", self.dt)
        _positive("dt_max", self.dt_max)
        for name in ("atol", "rtol", "err_atol", "err_rtol"):
            _nonneg(name, getattr(self, name))
        if self.atol == 0 and self.rtol == 0:
            raise ConfigError("atol and rtol are both 0: the steady-state test can never hold; set one > 0")
        if tab is not None and tab.adaptive and self.err_atol == 0 and self.err_rtol == 0:
            raise ConfigError("err_atol and err_rtol are both 0; the adaptive solver needs one > 0")
        if isinstance(self.max_steps, bool) or not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ConfigError(f"max_steps={self.max_steps!r} must be an integer ≥ 1")
        if isinstance(self.min_steps, bool) or not (isinstance(self.min_steps, int) and 0 <= self.min_steps <= self.max_steps):
            raise ConfigError(f"min_steps={self.min_steps!r} must be an integer in [0, max_steps={self.max_steps}]")

    def get_tableau(self) -> Tableau:
        return get_solver(self.solver)

    def get_backend(self) -> Backend | None:
        """The backend that runs this solver (e.g. brian2), or None for the torch engine."""
        return get_backend(self.solver)


class SettleResult(NamedTuple):
    """What a settle produced, per sample: nothing computed is dropped on failure."""

    states: tuple[Tensor, ...]  # per layer, (batch, n_l)
    status: Tensor  # int8 SettleStatus per sample
    steps: Tensor  # solver steps per sample (accepted and rejected)
    residual: Tensor  # final rms(f(s)) per sample
    time: Tensor  # settle time per sample, in units of τ
    nfev: int  # vector-field evaluations on the working batch

    @property
    def converged(self) -> bool:
        return bool((self.status == SettleStatus.CONVERGED).all())

    def counts(self) -> dict[str, int]:
        return {s.name.lower(): int((self.status == s).sum()) for s in SettleStatus}

    @property
    def message(self) -> str:
        n = self.status.numel()
        parts = []
        for st in (SettleStatus.NONFINITE, SettleStatus.STEP_LIMIT):
            bad = self.status == st
            k = int(bad.sum())
            if not k:
                continue
            if st is SettleStatus.STEP_LIMIT:
                what = (
                    f"{k} of {n} samples hit the step limit ({int(self.steps.max())} steps) with "
                    f"rms residual up to {float(self.residual[bad].max()):.3g}"
                )
            else:
                what = f"{k} of {n} samples became non-finite (NaN or inf)"
            parts.append(f"{st.name}: {what}; remedy: {st.remedy}")
        return "; ".join(parts) if parts else f"all {n} samples converged"


def rk_step(field, tab: Tableau, s: Tensor, k1: Tensor, h: float | Tensor, box=None):
    """One explicit Runge–Kutta step of ds/dt = field(s) from ``s`` with first stage ``k1``.

    ``h`` is a float or a (batch, 1) tensor of per-sample steps. The new state is projected
    onto ``box``; stage states are not (the field must be defined just outside the box, and
    projecting stages would hide an unstable step from the error estimate). Returns
    (s_new, stages); for a first-same-as-last tableau the last stage is field(s_new).
    """
    ks = [k1]
    n_eval = tab.stages - 1 if tab.fsal else tab.stages
    for i in range(1, n_eval):
        ks.append(field(_comb(s, tab.a[i], ks, h)))
    s_new = _proj(_comb(s, tab.b, ks, h), box)
    if tab.fsal:
        ks.append(field(s_new))
    return s_new, ks


def _comb(base: Tensor, coeffs, ks, h) -> Tensor:
    """base + h Σ_j coeffs[j] k_j (h a float or a (batch, 1) tensor)."""
    if isinstance(h, float):
        out = base
        for c, k in zip(coeffs, ks):
            if c != 0.0:
                out = out.add(k, alpha=h * c)
        return out if out is not base else base.clone()
    acc = None
    for c, k in zip(coeffs, ks):
        if c != 0.0:
            acc = k * c if acc is None else acc.add(k, alpha=c)
    return base.clone() if acc is None else torch.addcmul(base, h, acc)


def _proj(s: Tensor, box) -> Tensor:
    return s if box is None else s.clamp_(box[0], box[1])


def check_init(init: Sequence[Tensor], sizes: Sequence[int]) -> tuple[int, ...]:
    """The layer widths, after checking that ``init`` holds one (batch, width) tensor per layer."""
    sizes = tuple(int(n) for n in sizes)
    if len(init) != len(sizes) or any(t.ndim != 2 or t.shape[1] != n for t, n in zip(init, sizes)):
        raise ConfigError(
            f"initial state has layer shapes {[tuple(t.shape) for t in init]} but the dynamics "
            f"has layer widths {sizes}; pass one (batch, width) tensor per layer"
        )
    return sizes


def settle(
    dynamics: Dynamics,
    init: Sequence[Tensor],
    config: SettleConfig | None = None,
    *,
    throw: bool = True,
    compact_frac: float = 0.25,
    compact_min: int = 32,
) -> SettleResult:
    """Integrate ``dynamics`` from ``init`` (one (batch, n_l) tensor per layer) until each sample
    is steady (see the module docstring).

    Finished samples leave the working batch when they make up ``compact_frac`` of it and number
    at least ``compact_min`` (removing rows costs a fixed number of tensor operations, worth it
    only for enough rows; 0 and 0: at once). Until then they keep relaxing, which only lowers
    their residual. Their step count is the step at which they first met the test.

    A solver registered as a backend (``solver="brian2"``, see :data:`BACKENDS`) hands the
    settle, with all these arguments, to that backend, which has the same contract.

    Raises :class:`SettleError` (with the result attached) if any sample ends at the step limit
    or non-finite, unless ``throw=False``, in which case the status is in the result.
    """
    cfg = config or SettleConfig()
    backend = cfg.get_backend()
    if backend is not None:
        return backend.load()(dynamics, init, cfg, throw=throw, compact_frac=compact_frac, compact_min=compact_min)
    tab = cfg.get_tableau()
    box = dynamics.box
    sizes = check_init(init, dynamics.sizes)
    s = _proj(torch.cat(list(init), dim=1), box)  # our own copy, updated in place below
    B, N = s.shape
    dev, dtype = s.device, s.dtype
    # Working batch: original index and the step at which each sample finished (-1: running).
    active = torch.arange(B, device=dev)
    fin_step = torch.full((B,), -1, dtype=torch.int64, device=dev)
    running = torch.ones(B, dtype=torch.bool, device=dev)
    n_run = B
    chunks = []  # (original index, state, ‖f‖, finish step, finish time) of samples taken out
    dyn = dynamics
    field = dyn.field
    # a dynamics read through noisy devices declares the rms of its field noise per component:
    # twice that is added to the absolute tolerance (a settle cannot get below its own noise)
    atol_n = (cfg.atol + 2.0 * float(getattr(dynamics, "noise_floor", 0.0))) * math.sqrt(N)
    use_rtol = cfg.rtol > 0
    # Euler with dt ≤ 1 on a box field of the form clip(·) − s moves each state to a convex
    # combination of two points of the box: projection is then a no-op and is skipped.
    euler = tab.name == "euler"
    pbox = None if (euler and cfg.dt <= 1.0) else box
    adaptive = tab.adaptive
    if adaptive:
        h: float | Tensor = torch.full((B, 1), float(cfg.dt), dtype=dtype, device=dev)
        t_now = torch.zeros(B, dtype=dtype, device=dev)
        t_fin = torch.zeros(B, dtype=dtype, device=dev)
        expo = -1.0 / (tab.err_order + 1)
    k = field(s)
    nfev = 1
    n = 0

    def take(ix: Tensor | None, rn: Tensor) -> None:
        t = torch.where(fin_step >= 0, t_fin, t_now) if adaptive else None
        if ix is None:
            chunks.append((active, s, rn, fin_step, t))
        else:
            chunks.append((active[ix], s[ix], rn[ix], fin_step[ix], t[ix] if adaptive else None))

    for n in range(cfg.max_steps + 1):
        rn = torch.linalg.vector_norm(k, dim=1)
        if n < cfg.min_steps:  # too early to stop anyone
            pending = torch.ones_like(running)
        elif use_rtol:
            pending = rn > torch.linalg.vector_norm(s, dim=1).mul_(cfg.rtol).add_(atol_n)
        else:
            pending = rn > atol_n
        # NaN compares false, so a NaN residual counts as finished (it is labelled NONFINITE).
        if n_run == running.shape[0]:  # no finished rows linger in the working batch
            any_new = not bool(pending.all())
            new = pending.logical_not() if any_new else None
        else:
            new = pending.logical_not().logical_and_(running)
            any_new = bool(new.any())
        if any_new:
            fin_step = torch.where(new, n, fin_step)
            if adaptive:
                t_fin = torch.where(new, t_now, t_fin)
            running = running.logical_and_(pending)
            n_run = int(running.sum())
        if n_run == 0 or n == cfg.max_steps:
            take(None, rn)
            break
        n_fin = running.shape[0] - n_run
        if n_fin > 0 and n_fin >= max(compact_frac * running.shape[0], compact_min):
            take(running.logical_not().nonzero().squeeze(1), rn)
            ki = running.nonzero().squeeze(1)
            active, s, k, fin_step = active[ki], s[ki], k[ki], fin_step[ki]
            running = torch.ones(n_run, dtype=torch.bool, device=dev)
            dyn = dyn.restrict(ki)
            field = dyn.field
            if adaptive:
                h, t_now, t_fin = h[ki], t_now[ki], t_fin[ki]

        if euler:  # s ← s + dt·f(s), in place
            _proj(s.add_(k, alpha=cfg.dt), pbox)
            k = field(s)
            nfev += 1
            continue
        if not adaptive:
            s, _ = rk_step(field, tab, s, k, float(cfg.dt), pbox)
            k = field(s)
            nfev += tab.stages
            continue
        s_new, ks = rk_step(field, tab, s, k, h, pbox)
        nfev += tab.stages - 1
        # local error estimate, per component scaled by err_atol + err_rtol·max(|s|, |s_new|)
        err = _comb(torch.zeros_like(s), tab.b_err, ks, h)
        scale = torch.maximum(s.abs(), s_new.abs()).mul_(cfg.err_rtol).add_(cfg.err_atol)
        en = torch.linalg.vector_norm(err.div_(scale), dim=1) / math.sqrt(N)
        accept = en <= 1.0
        factor = torch.nan_to_num(0.9 * en.clamp_min(1e-10).pow(expo), nan=0.2).clamp(0.2, 5.0)
        acc = accept.unsqueeze(1)
        s = torch.where(acc, s_new, s)
        k = torch.where(acc, ks[-1], k)
        t_now = t_now + torch.where(accept, h.squeeze(1), 0.0)
        h = (h * factor.unsqueeze(1)).clamp_max(cfg.dt_max)

    # Assemble the per-sample outputs from the chunks, in the original sample order.
    idx, st, rn, fs = (torch.cat([c[i] for c in chunks]) for i in range(4))
    order = torch.empty_like(idx)
    order[idx] = torch.arange(B, device=dev)
    st, rn, fs = st[order], rn[order], fs[order]
    done = fs >= 0
    status = torch.where(done, SettleStatus.CONVERGED, SettleStatus.STEP_LIMIT)
    status = torch.where(rn.isnan() | rn.isinf(), SettleStatus.NONFINITE, status).to(torch.int8)
    steps = torch.where(done, fs, n)
    if adaptive:
        time = torch.cat([c[4] for c in chunks])[order]
    else:
        time = steps.to(dtype) * cfg.dt
    result = SettleResult(tuple(st.split(list(sizes), dim=1)), status, steps, rn / math.sqrt(N), time, nfev)
    if throw and not result.converged:
        raise SettleError(f"settle did not reach a steady state: {result.message}", result)
    return result


def integrate(field, y0: Tensor, t_end: float, n_steps: int, solver: str = "rk4") -> Tensor:
    """Integrate dy/dt = field(y) from 0 to ``t_end`` in ``n_steps`` fixed steps with any tableau
    (an adaptive one propagates its higher-order solution). For solver checks and small ODEs."""
    tab = get_solver(solver)  # a backend name is an error here: integrate runs tableaus only
    h = float(t_end) / n_steps
    y = y0
    for _ in range(n_steps):
        y, _ = rk_step(field, tab, y, field(y), h)
    return y

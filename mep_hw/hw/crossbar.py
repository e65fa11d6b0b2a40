"""Resistive crossbar devices (PCM, ReRAM, ECRAM, FeFET): a differential conductance pair per
weight, w̃ = (G⁺ − G⁻) / (g_max − g_min).

Physics, all in physical units (µS, s):

* programming: G is set to the target (rounded to ``levels`` if quantised) plus programming
  noise: constant relative, or PCM's conductance-dependent σ(g) = c₀ + c₁g + c₂g² µS with
  g = G/g_max (Nandakumar et al. 2019, the polynomial of aihwkit's PCMLikeNoiseModel, referenced
  to g_max = 25 µS and scaled by g_max/25);
* reading: per-device Gaussian noise of σ = read_noise·(g_max − g_min), resampled at every read;
  drift G(t) = G₀ ((t − t_prog + t₀)/t₀)^(−ν) with ν ~ N(ν̄, σ_ν) per device, t₀ the first read;
  a first-order IR drop w̃_eff = w̃ (1 − ir_drop · i/(n_in − 1)) along the input lines;
* device-to-device variation (sampled once): the conductance range g_max per device and the pulse
  size per device, relative spreads ``g_dtod``, ``dw_dtod``; stuck-on (G = g_max) and stuck-off
  (G = g_min) devices at given rates, which never move;
* pulsed updates: n = round(|Δw̃|·(g_max − g_min)/Δg) pulses of nominal size Δg (= the level
  spacing when quantised), up/down asymmetry a (Δg↑ = Δg(1 + a/2), Δg↓ = Δg(1 − a/2)),
  cycle-to-cycle noise σ·Δg·√n, and a response: ``linear`` (saturating at the bounds),
  ``soft_bounds`` (each pulse moves G by Δg times its distance to the bound over the range), or
  ``exponential`` (NeuroSim: G = B(1 − e^(−P/A)) + g_min on the pulse axis P, with A from the
  nonlinearity label as in NeuroSim; closed form for n pulses). ``unidirectional`` devices (PCM)
  only potentiate: Δw̃ > 0 pulses G⁺, Δw̃ < 0 pulses G⁻, and a pair whose device saturates is
  re-programmed (a refresh); ``bidirectional`` devices split the pulses between G⁺ (one way) and
  G⁻ (the other way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from mep_hw.errors import ConfigError
from mep_hw.hw.base import Device, UpdateCounts, check_range

__all__ = ["CrossbarDevice", "CrossbarState", "neurosim_a", "RESPONSES", "UPDATE_MODES", "PROG_NOISE_MODELS"]

RESPONSES = ("linear", "soft_bounds", "exponential")
UPDATE_MODES = ("unidirectional", "bidirectional")
PROG_NOISE_MODELS = ("none", "relative", "pcm")


def neurosim_a(nl: float) -> float:
    """A / P_max of NeuroSim's exponential weight-update curve for its nonlinearity label ``nl``.

    The normalised curve g(p) = (1 − e^(−p/a)) / (1 − e^(−1/a)), p ∈ [0, 1], deviates from the
    straight line by at most d(a), reached where g'(p) = 1; the label is 10·d(a). Inverted by
    bisection. Matches NeuroSim's getParamA table to within 1.1 % (it evaluates the deviation on a
    discrete pulse grid). Label 0 is linear (a = ∞).
    """
    nl = abs(float(nl))
    if nl == 0.0:
        return math.inf

    def dev(a):
        c = -math.expm1(-1.0 / a)
        p = -a * math.log(a * c)
        return -math.expm1(-p / a) / c - p

    lo, hi = math.log(1e-4), math.log(1e8)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 10.0 * dev(math.exp(mid)) > nl:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


class CrossbarState(NamedTuple):
    gp: Tensor  # G⁺ (µS)
    gm: Tensor  # G⁻ (µS)
    gmax_p: Tensor  # per-device upper bound (µS)
    gmax_m: Tensor
    dw_p: Tensor  # per-device pulse-size factor
    dw_m: Tensor
    stuck_p: Tensor  # int8: 0 free, +1 stuck on, −1 stuck off
    stuck_m: Tensor
    nu_p: Tensor  # drift exponents
    nu_m: Tensor
    tprog_p: Tensor  # time of the last write (s)
    tprog_m: Tensor
    t_now: float  # the device clock (s)


@dataclass(frozen=True, kw_only=True)
class CrossbarDevice(Device):
    """A resistive crossbar with a differential pair per weight (see the module docstring)."""

    kind: ClassVar[str] = "crossbar"
    name: str = "crossbar"
    g_min_uS: float = 0.0
    g_max_uS: float = 25.0
    levels: int = 0  # programmable conductance levels per device; 0 = continuous
    prog_noise_model: str = "none"
    prog_noise: float = 0.0  # 'relative': σ/(g_max − g_min); 'pcm': scale of the polynomial
    prog_coeffs_uS: tuple[float, float, float] = (0.26348, 1.9650, -1.1731)
    prog_ref_g_max_uS: float = 25.0
    read_noise: float = 0.0  # σ per read per device, relative to g_max − g_min
    drift_nu_mean: float = 0.0
    drift_nu_std: float = 0.0
    drift_t0_s: float = 20.0
    g_dtod: float = 0.0
    dw_dtod: float = 0.0
    stuck_on_rate: float = 0.0
    stuck_off_rate: float = 0.0
    ir_drop: float = 0.0
    dw_min_uS: float = 0.0  # pulse size when not quantised (0: range/1000)
    dw_ctoc: float = 0.0
    up_down_asym: float = 0.0
    response: str = "linear"
    nl_ltp: float = 0.0  # NeuroSim nonlinearity labels (response='exponential')
    nl_ltd: float = 0.0
    update_mode: str = "bidirectional"
    t_step_s: float = 1e-3  # device time per training step (drift clock)

    def __post_init__(self):
        check_range("g_min_uS", self.g_min_uS, lo=0.0)
        check_range("g_max_uS", self.g_max_uS, lo=self.g_min_uS, lo_open=True)
        check_range("levels", self.levels, lo=0, hi=1 << 20, integer=True)
        if self.levels == 1:
            raise ConfigError("levels=1 is out of range: a device needs 0 (continuous) or at least 2 levels")
        for name, valid in (("prog_noise_model", PROG_NOISE_MODELS), ("response", RESPONSES), ("update_mode", UPDATE_MODES)):
            if getattr(self, name) not in valid:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not valid; choose one of: {', '.join(valid)}")
        for name in ("prog_noise", "read_noise", "drift_nu_mean", "drift_nu_std", "g_dtod", "dw_dtod", "dw_ctoc", "ir_drop"):
            check_range(name, getattr(self, name), lo=0.0, hi=10.0)
        for name in ("stuck_on_rate", "stuck_off_rate"):
            check_range(name, getattr(self, name), lo=0.0, hi=1.0)
        if self.stuck_on_rate + self.stuck_off_rate > 1:
            raise ConfigError("stuck_on_rate + stuck_off_rate must not exceed 1")
        check_range("drift_t0_s", self.drift_t0_s, lo=0.0, lo_open=True)
        check_range("t_step_s", self.t_step_s, lo=0.0)
        check_range("dw_min_uS", self.dw_min_uS, lo=0.0, hi=self.g_max_uS - self.g_min_uS)
        check_range("up_down_asym", self.up_down_asym, lo=-1.99, hi=1.99)
        for name in ("nl_ltp", "nl_ltd"):
            check_range(name, getattr(self, name), lo=-9.0, hi=9.0)
        check_range("prog_ref_g_max_uS", self.prog_ref_g_max_uS, lo=0.0, lo_open=True)
        if len(self.prog_coeffs_uS) != 3:
            raise ConfigError(f"prog_coeffs_uS must hold 3 coefficients (c0, c1, c2 in µS), got {list(self.prog_coeffs_uS)}")

    # ------------------------------------------------------------------ maps
    @property
    def g_range(self) -> float:
        return self.g_max_uS - self.g_min_uS

    @property
    def dg(self) -> float:
        """Nominal conductance change per pulse (µS): the level spacing when quantised."""
        if self.levels:
            return self.g_range / (self.levels - 1)
        return self.dw_min_uS or self.g_range / 1000.0

    @property
    def pulses_full_range(self) -> float:
        return self.g_range / self.dg

    def to_physical(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Target (G⁺, G⁻) in µS for normalised weights w̃ (before noise and quantisation)."""
        w = w.clamp(-1.0, 1.0)
        if self.update_mode == "unidirectional":  # one device at g_min: room to potentiate
            return self.g_min_uS + w.clamp(min=0) * self.g_range, self.g_min_uS + (-w).clamp(min=0) * self.g_range
        mid = 0.5 * (self.g_min_uS + self.g_max_uS)
        return mid + 0.5 * w * self.g_range, mid - 0.5 * w * self.g_range

    def to_logical(self, gp: Tensor, gm: Tensor) -> Tensor:
        return (gp - gm) / self.g_range

    # ------------------------------------------------------------------ state
    def init_state(self, shape, generator, dtype, device) -> CrossbarState:
        def rand_like_shape():
            return torch.rand(shape, generator=generator, dtype=torch.float64).to(dtype)

        def randn_shape():
            return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)

        def stuck():
            u = rand_like_shape()
            out = torch.zeros(shape, dtype=torch.int8)
            out[u < self.stuck_on_rate] = 1
            out[(u >= self.stuck_on_rate) & (u < self.stuck_on_rate + self.stuck_off_rate)] = -1
            return out

        def gmax():
            return (self.g_min_uS + self.g_range * (1.0 + self.g_dtod * randn_shape())).clamp(min=self.g_min_uS + 1e-6 * self.g_range)

        def dw():
            return (1.0 + self.dw_dtod * randn_shape()).clamp(min=0.0)

        def nu():
            return (self.drift_nu_mean + self.drift_nu_std * randn_shape()).clamp(min=0.0)

        gmin = torch.full(shape, self.g_min_uS, dtype=dtype)
        st = CrossbarState(gmin.clone(), gmin.clone(), gmax(), gmax(), dw(), dw(), stuck(), stuck(), nu(), nu(),
                           torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), 0.0)
        st = st._replace(gp=self._pin(st.gp, st.stuck_p, st.gmax_p), gm=self._pin(st.gm, st.stuck_m, st.gmax_m))
        return CrossbarState(*[t.to(device) if isinstance(t, Tensor) else t for t in st])

    def _pin(self, g: Tensor, stuck: Tensor, gmax: Tensor) -> Tensor:
        """Stuck devices hold their stuck value whatever was written."""
        g = torch.where(stuck > 0, gmax, g)
        return torch.where(stuck < 0, torch.full_like(g, self.g_min_uS), g)

    def _quantise(self, g: Tensor) -> Tensor:
        if not self.levels:
            return g
        return ((g - self.g_min_uS) / self.dg).round_().mul_(self.dg).add_(self.g_min_uS)

    def prog_sigma(self, g: Tensor) -> Tensor | float:
        """Programming noise σ (µS) at target conductance g."""
        if self.prog_noise_model == "none" or self.prog_noise == 0:
            return 0.0
        if self.prog_noise_model == "relative":
            return self.prog_noise * self.g_range
        c0, c1, c2 = self.prog_coeffs_uS
        x = g / self.g_max_uS
        return self.prog_noise * (c0 + c1 * x + c2 * x * x) * (self.g_max_uS / self.prog_ref_g_max_uS)

    def _write(self, target: Tensor, gmax: Tensor, stuck: Tensor, gen) -> Tensor:
        g = self._quantise(target.clamp(self.g_min_uS, self.g_max_uS))
        sig = self.prog_sigma(g)
        if not (isinstance(sig, float) and sig == 0.0):
            g = g + sig * torch.randn(g.shape, generator=gen, dtype=torch.float64).to(g.dtype).to(g.device)
        g = torch.minimum(g.clamp(min=self.g_min_uS), gmax)
        return self._pin(g, stuck, gmax)

    def program(self, state: CrossbarState, w: Tensor, generator) -> CrossbarState:
        tp, tm = self.to_physical(w)
        gp = self._write(tp, state.gmax_p, state.stuck_p, generator)
        gm = self._write(tm, state.gmax_m, state.stuck_m, generator)
        now = torch.full_like(gp, state.t_now)
        return state._replace(gp=gp, gm=gm, tprog_p=now, tprog_m=now.clone())

    def _drifted(self, g: Tensor, nu: Tensor, tprog: Tensor, t_now: float) -> Tensor:
        if self.drift_nu_mean == 0 and self.drift_nu_std == 0:
            return g
        t0 = self.drift_t0_s
        return g * ((t_now - tprog + t0) / t0).pow(-nu)

    def mean(self, state: CrossbarState) -> Tensor:
        gp = self._drifted(state.gp, state.nu_p, state.tprog_p, state.t_now)
        gm = self._drifted(state.gm, state.nu_m, state.tprog_m, state.t_now)
        w = (gp - gm) / self.g_range
        if self.ir_drop and w.shape[1] > 1:
            pos = torch.linspace(0.0, 1.0, w.shape[1], dtype=w.dtype, device=w.device)
            w = w * (1.0 - self.ir_drop * pos)
        return w

    def read_std(self, state) -> float | None:
        # two independent devices per weight: Var(w̃) = 2 σ² / range², σ = read_noise · range
        return None if self.read_noise == 0 else math.sqrt(2.0) * self.read_noise

    def advance(self, state: CrossbarState, seconds: float) -> CrossbarState:
        return state._replace(t_now=state.t_now + float(seconds))

    def physical(self, state: CrossbarState) -> dict[str, tuple[Tensor, str]]:
        return {
            "g_plus": (self._drifted(state.gp, state.nu_p, state.tprog_p, state.t_now), "uS"),
            "g_minus": (self._drifted(state.gm, state.nu_m, state.tprog_m, state.t_now), "uS"),
        }

    # ------------------------------------------------------------------ pulses
    def _pulse(self, g: Tensor, n: Tensor, up: bool, gmax: Tensor, dwf: Tensor, gen) -> Tensor:
        """Apply n (≥ 0, per device) identical pulses in one direction; returns the new G."""
        a = self.up_down_asym
        step = self.dg * (1.0 + a / 2 if up else 1.0 - a / 2) * dwf
        rng = gmax - self.g_min_uS
        if self.response == "linear":
            g_new = g + (n * step if up else -n * step)
        elif self.response == "soft_bounds":
            r = (1.0 - step / rng).clamp(min=0.0).pow(n)
            g_new = gmax - (gmax - g) * r if up else self.g_min_uS + (g - self.g_min_uS) * r
        else:  # exponential (NeuroSim), on the pulse axis of this device
            p_max = self.pulses_full_range / dwf.clamp(min=1e-6)
            A = neurosim_a(self.nl_ltp if up else self.nl_ltd) * p_max
            if math.isinf(float(A.max())) if isinstance(A, Tensor) else math.isinf(A):
                g_new = g + (n * step if up else -n * step)
            else:
                B = rng / (-torch.expm1(-p_max / A))
                if up:
                    g_new = self.g_min_uS + B - (self.g_min_uS + B - g) * torch.exp(-n / A)
                else:
                    g_new = gmax - B + (g - gmax + B) * torch.exp(-n / A)
        if self.dw_ctoc:
            noise = torch.randn(g.shape, generator=gen, dtype=torch.float64).to(g.dtype).to(g.device)
            g_new = g_new + self.dw_ctoc * self.dg * dwf * n.sqrt() * noise
        g_new = self._quantise(torch.minimum(g_new.clamp(min=self.g_min_uS), gmax))
        return torch.where(n > 0, g_new, g)  # a device that takes no pulse does not move

    def update(self, state: CrossbarState, dw: Tensor, generator) -> tuple[CrossbarState, UpdateCounts]:
        n = (dw.abs() * (self.g_range / self.dg)).round_()
        pos = dw > 0
        free_p, free_m = state.stuck_p == 0, state.stuck_m == 0
        if self.update_mode == "unidirectional":  # only potentiation: G⁺ for w up, G⁻ for w down
            np_ = torch.where(pos & free_p, n, torch.zeros_like(n))
            nm_ = torch.where(~pos & free_m, n, torch.zeros_like(n))
            gp = self._pulse(state.gp, np_, True, state.gmax_p, state.dw_p, generator)
            gm = self._pulse(state.gm, nm_, True, state.gmax_m, state.dw_m, generator)
            up, down = int(np_.sum() + nm_.sum()), 0
        else:  # G⁺ moves with w, G⁻ against it, each taking half of the pulses
            np_ = torch.where(free_p, torch.ceil(n / 2), torch.zeros_like(n))
            nm_ = torch.where(free_m, n - torch.ceil(n / 2), torch.zeros_like(n))
            gp = torch.where(pos, self._pulse(state.gp, np_, True, state.gmax_p, state.dw_p, generator),
                             self._pulse(state.gp, np_, False, state.gmax_p, state.dw_p, generator))
            gm = torch.where(pos, self._pulse(state.gm, nm_, False, state.gmax_m, state.dw_m, generator),
                             self._pulse(state.gm, nm_, True, state.gmax_m, state.dw_m, generator))
            up = int(torch.where(pos, np_, nm_).sum())
            down = int(torch.where(pos, nm_, np_).sum())
        gp = self._pin(gp, state.stuck_p, state.gmax_p)
        gm = self._pin(gm, state.stuck_m, state.gmax_m)
        now = state.t_now
        tprog_p = torch.where(np_ > 0, torch.full_like(gp, now), state.tprog_p)
        tprog_m = torch.where(nm_ > 0, torch.full_like(gm, now), state.tprog_m)
        new = state._replace(gp=gp, gm=gm, tprog_p=tprog_p, tprog_m=tprog_m)
        refreshes = 0
        if self.update_mode == "unidirectional":
            # a pair whose device is within one pulse of its bound cannot move that way again:
            # re-program it to its present weight (the smaller device back at g_min)
            sat = ((gp >= state.gmax_p - 0.5 * self.dg) & free_p) | ((gm >= state.gmax_m - 0.5 * self.dg) & free_m)
            refreshes = int(sat.sum())
            if refreshes:
                w_now = self.to_logical(gp, gm)
                reprog = self.program(new, w_now, generator)
                new = new._replace(
                    gp=torch.where(sat, reprog.gp, gp), gm=torch.where(sat, reprog.gm, gm),
                    tprog_p=torch.where(sat, reprog.tprog_p, tprog_p), tprog_m=torch.where(sat, reprog.tprog_m, tprog_m),
                )
        return new, UpdateCounts(up, down, refreshes, 0)

"""Fixed-point datapaths (FPGA): Qm.n weights and activations, a wide accumulator, rounding and
overflow modes, bit-exact.

A signed Q format with word length b and f fractional bits holds integers k ∈ [−2^(b−1),
2^(b−1) − 1] meaning k·2^(−f). A layer computes, exactly as an integer datapath would:

    x_k = Q_act(x)              (round to act_frac bits, overflow to act_bits)
    acc = Σ_i x_k,i · w_k,ji     (integer products, exact; the sum overflows to acc_bits)
    y_k = Q(acc / 2^weight_frac) (back to act_frac bits with the rounding mode, overflow to act_bits)

Rounding: ``nearest_even`` (ties to even), ``stochastic`` (floor(v + U[0, 1)), unbiased), or
``truncate`` (floor: dropping low bits of a two's-complement number). Overflow: ``saturate``
(clip to the range) or ``wrap`` (two's-complement modulo 2^b). The accumulator saturates or wraps
once, on the finished sum (a DSP48-style accumulator with a final saturation stage). Integer sums
are formed in float64, exact while |acc| < 2^53 (acc_bits ≤ 53 is enforced).

Weights are held in absolute units (the tile's scale is 1); updates round w + Δw back to the
weight format with the rounding mode (stochastic rounding keeps small updates unbiased).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from mep_hw.errors import ConfigError
from mep_hw.hw.base import Device, UpdateCounts, check_range

__all__ = ["FixedPointDevice", "FixedPointState", "to_fixed", "ROUNDINGS", "OVERFLOWS"]

ROUNDINGS = ("nearest_even", "stochastic", "truncate")
OVERFLOWS = ("saturate", "wrap")


def _overflow(k: Tensor, bits: int, mode: str) -> Tensor:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if mode == "saturate":
        return k.clamp(lo, hi)
    span = 2**bits
    return torch.remainder(k - lo, span) + lo


def _round(v: Tensor, mode: str, generator: torch.Generator | None) -> Tensor:
    if mode == "nearest_even":
        return torch.round(v)  # ties to even
    if mode == "truncate":
        return torch.floor(v)
    u = torch.rand(v.shape, generator=generator, dtype=torch.float64,
                   device=generator.device if generator is not None else v.device).to(v.device)
    return torch.floor(v + u)


def to_fixed(v: Tensor, bits: int, frac: int, rounding: str, overflow: str, generator=None) -> Tensor:
    """Integers (float64 tensor of exact integer values) of v in Q(bits, frac)."""
    return _overflow(_round(v.double() * 2.0**frac, rounding, generator), bits, overflow)


class FixedPointState(NamedTuple):
    w: Tensor  # integer weights (float64 holding exact integers)


@dataclass(frozen=True, kw_only=True)
class FixedPointDevice(Device):
    kind: ClassVar[str] = "fixed_point"
    name: str = "fixed_point"
    weight_bits: int = 16
    weight_frac: int = 14
    act_bits: int = 16
    act_frac: int = 12
    acc_bits: int = 48
    rounding: str = "nearest_even"
    overflow: str = "saturate"
    clock_hz: float = 2.0e8  # datapath clock (settle latency, see the cost accounting)

    def __post_init__(self):
        check_range("weight_bits", self.weight_bits, 2, 32, integer=True)
        check_range("act_bits", self.act_bits, 2, 32, integer=True)
        check_range("weight_frac", self.weight_frac, 0, self.weight_bits - 1, integer=True)
        check_range("act_frac", self.act_frac, 0, self.act_bits - 1, integer=True)
        check_range("acc_bits", self.acc_bits, max(self.weight_bits, self.act_bits), 53, integer=True)
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"rounding={self.rounding!r} is not valid; choose one of: {', '.join(ROUNDINGS)}")
        if self.overflow not in OVERFLOWS:
            raise ConfigError(f"overflow={self.overflow!r} is not valid; choose one of: {', '.join(OVERFLOWS)}")
        if not (isinstance(self.clock_hz, (int, float)) and self.clock_hz > 0):
            raise ConfigError(f"clock_hz={self.clock_hz!r} must be a number > 0 (Hz)")

    @property
    def weight_limit(self) -> float | None:
        """The largest Q(weight_bits, weight_frac) value when overflow saturates (None when it wraps)."""
        if self.overflow != "saturate":
            return None
        return (2.0 ** (self.weight_bits - 1) - 1) * 2.0 ** (-self.weight_frac)

    def mapping_scale(self, W: Tensor, headroom: float) -> float:
        return 1.0  # weights are held in absolute units; the Q format bounds them

    def init_state(self, shape, generator, dtype, device) -> FixedPointState:
        return FixedPointState(torch.zeros(shape, dtype=torch.float64, device=device))

    def program(self, state, w: Tensor, generator) -> FixedPointState:
        return FixedPointState(to_fixed(w, self.weight_bits, self.weight_frac, self.rounding, self.overflow, generator))

    def mean(self, state: FixedPointState) -> Tensor:
        return (state.w * 2.0 ** (-self.weight_frac)).to(torch.get_default_dtype())

    def update(self, state: FixedPointState, dw: Tensor, generator):
        new = to_fixed(state.w * 2.0 ** (-self.weight_frac) + dw.double(), self.weight_bits, self.weight_frac,
                       self.rounding, self.overflow, generator)
        d = new - state.w
        return FixedPointState(new), UpdateCounts(int(d.clamp(min=0).sum()), int((-d).clamp(min=0).sum()), 0, 0)

    def physical(self, state: FixedPointState) -> dict[str, tuple[Tensor, str]]:
        return {"weight_int": (state.w.to(torch.int64), f"LSB (2^-{self.weight_frac})")}

    def quantize_act(self, x: Tensor, generator=None) -> Tensor:
        return to_fixed(x, self.act_bits, self.act_frac, self.rounding, self.overflow, generator)

    def integer_mvm(self, w_int: Tensor, x_int: Tensor, transpose: bool, generator=None) -> Tensor:
        """The integer datapath: returns output integers in the activation format."""
        acc = x_int @ (w_int if transpose else w_int.T)  # exact in float64 below 2^53
        acc = _overflow(acc, self.acc_bits, self.overflow)
        y = _round(acc * 2.0 ** (-self.weight_frac), self.rounding, generator)
        return _overflow(y, self.act_bits, self.overflow)

    def device_mvm(self, state: FixedPointState, x: Tensor, transpose: bool) -> Tensor:
        y = self.integer_mvm(state.w, self.quantize_act(x), transpose)
        return (y * 2.0 ** (-self.act_frac)).to(x.dtype)

"""Periphery of an analog array: DAC on the inputs, ADC on the outputs, output noise.

Composed with any device (DESIGN §4.3), in the normalised units of aihwkit's IOParameters: inputs
x̃ = x / in_scale, weights w̃ = W / w_scale ∈ [−1, 1], outputs ỹ = x̃ w̃ᵀ. A b-bit signed
converter over [−bound, bound] has 2^b − 1 levels, step 2·bound/(2^b − 2); values beyond the
bound saturate. ``*_bits = 0`` is an ideal converter (no quantisation, no bound). aihwkit's
defaults are 7-bit DAC with bound 1, 9-bit ADC with bound 12 and output noise 0.06 (std, in ỹ
units).

Opt-in management of the analog read, as aihwkit's IOParameters (both off by default here, so
the default read is unchanged; aihwkit's own defaults are ``abs_max`` and ``iterative``):

* ``noise_management = "abs_max"``: each input vector is divided by α = max_i |x̃_i| (capped at
  ``nm_thres`` when that is > 0) before the DAC and the output multiplied by α: small inputs use
  the DAC's full range, so their relative output noise no longer grows as 1/|x̃|
  (aihwkit NoiseManagementType.ABS_MAX);
* ``bound_management = "iterative"``: a vector whose output reaches the ADC bound is read again
  with its inputs halved, and again, until no output saturates or the reduction exceeds
  ``max_bm_factor`` or ``max_bm_res`` / (DAC resolution) (aihwkit BoundManagementType.ITERATIVE,
  with its defaults 1000 and 0.25).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from mep_hw.errors import ConfigError

__all__ = ["Periphery", "quantize", "NOISE_MANAGEMENT", "BOUND_MANAGEMENT"]

NOISE_MANAGEMENT = ("none", "abs_max")
BOUND_MANAGEMENT = ("none", "iterative")


def quantize(x: Tensor, bits: int, bound: float) -> Tensor:
    """Signed uniform quantiser: clip to [−bound, bound], round to the step 2·bound/(2^bits − 2).
    Returns a new tensor; ``bits = 0`` returns ``x`` itself."""
    if bits == 0:
        return x
    step = 2.0 * bound / (2**bits - 2)
    return x.clamp(-bound, bound).mul_(1.0 / step).round_().mul_(step)


@dataclass(frozen=True, kw_only=True)
class Periphery:
    dac_bits: int = 0
    dac_bound: float = 1.0
    adc_bits: int = 0
    adc_bound: float = 12.0
    out_noise: float = 0.0
    w_headroom: float = 2.0  # mapping: w_scale = w_headroom × (largest weight magnitude at the first program)
    # remapping: when a host write leaves the w_remap_quantile-quantile of a tile's |w̃| at or above this
    # fraction of its range, the tile is re-programmed with w_scale = w_headroom × that quantile of |w|
    # (0: never; crossbar devices only). A quantile, not the largest: a few cells driven to a bound by
    # cycle-to-cycle noise must not grow the scale (each remap would coarsen the pulses, more cells
    # would reach a bound, and the scale would run away: TaOx ReRAM diverged so)
    w_remap: float = 0.95
    w_remap_quantile: float = 0.999
    noise_management: str = "none"  # "abs_max": inputs scaled by max|x̃| per vector (aihwkit's default)
    nm_thres: float = 0.0  # cap of the abs_max scale (0: none)
    bound_management: str = "none"  # "iterative": re-read with halved inputs while the ADC saturates
    max_bm_factor: int = 1000
    max_bm_res: float = 0.25

    def __post_init__(self):
        for name in ("dac_bits", "adc_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not (v == 0 or 2 <= v <= 24):
                raise ConfigError(f"{name}={v!r} must be 0 (ideal converter) or an integer in [2, 24]")
        for name in ("dac_bound", "adc_bound", "w_headroom"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name}={v!r} must be a finite number > 0")
        v = self.w_remap
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= v <= 1.0):
            raise ConfigError(f"w_remap={v!r} must be in [0, 1] (0: never remap; e.g. 0.95: remap a tile whose largest "
                              "weight reaches 95 % of its range)")
        v = self.w_remap_quantile
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.5 <= v <= 1.0):
            raise ConfigError(f"w_remap_quantile={v!r} must be in [0.5, 1] (1: the largest |w̃| decides; default 0.999)")
        if self.w_remap and self.w_remap * self.w_headroom <= 1.0:
            raise ConfigError(f"w_remap={self.w_remap} with w_headroom={self.w_headroom}: a remapped tile would be at "
                              "its threshold at once; w_remap × w_headroom must exceed 1: raise w_headroom, or set w_remap=0 (never remap)")
        v = self.out_noise
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"out_noise={v!r} must be a finite number ≥ 0 (std in normalised output units)")
        for name, valid in (("noise_management", NOISE_MANAGEMENT), ("bound_management", BOUND_MANAGEMENT)):
            if getattr(self, name) not in valid:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not valid; choose one of: {', '.join(valid)}")
        for name in ("nm_thres", "max_bm_res"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name}={v!r} must be a finite number ≥ 0")
        v = self.max_bm_factor
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"max_bm_factor={v!r} must be an integer ≥ 1")

    @property
    def dac_step(self) -> float:
        return 0.0 if self.dac_bits == 0 else 2.0 * self.dac_bound / (2**self.dac_bits - 2)

    @property
    def adc_step(self) -> float:
        return 0.0 if self.adc_bits == 0 else 2.0 * self.adc_bound / (2**self.adc_bits - 2)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

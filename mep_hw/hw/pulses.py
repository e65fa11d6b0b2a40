"""Stochastic pulse coincidence: how a crossbar applies an outer-product update in place.

Gokmen & Vlasov (Front. Neurosci. 10:333, 2016): to add η·d xᵀ to an array, every row j (input
x_j) sends a train of BL time slots, each holding a pulse with probability p_j = min(1, C_x·|x_j|)
and the sign of x_j; every column i (error or activity d_i) does the same with q_i =
min(1, C_d·|d_i|). A device sees a pulse where a row pulse and a column pulse coincide; it moves
by its pulse step ±Δw_min in the direction sign(x_j)·sign(d_i). Row and column trains are
independent, so the expected number of coincidences of cell (i, j) is BL·p_j·q_i and

    E[Δw_ij] = Δw_min · BL · C_x · C_d · x_j d_i   (while no probability is clipped),

i.e. the learning rate is η = Δw_min·BL·C_x·C_d. The counts are correlated across a row (and a
column): they share its train; this is simulated exactly by drawing the trains and counting
coincidences with one matrix product over all samples and slots of a batch. aihwkit's "update
management" (Gokmen & Vlasov 2016, §Methods) balances the two probabilities,
C_x = √(η/(BL·Δw_min) · m_d/m_x), C_d = √(η/(BL·Δw_min) · m_x/m_d) with m_x = max|x|, m_d = max|d|
of the batch, so that neither saturates before the other.

Per cell the coincidence count of one sample is a sum of BL independent Bernoulli(p_j q_i)
variables (a row slot and a column slot coincide with probability p_j q_i), so its variance is
BL·p_j q_i (1 − p_j q_i); over a batch, the variances of the samples add.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from mep_hw.errors import ConfigError

__all__ = ["Coincidences", "coincidences", "update_management"]


class Coincidences(NamedTuple):
    up: Tensor  # per cell (out, in): coincidences that move the weight up, summed over the batch
    down: Tensor  # … that move it down


def update_management(eta: float, bl: int, dw_min: float, x_max: float, d_max: float) -> tuple[float, float]:
    """(C_x, C_d) so that Δw_min·BL·C_x·C_d = η, balanced by the batch maxima (see the module
    docstring). η and Δw_min in the same (normalised weight) units."""
    if not (eta >= 0 and math.isfinite(eta)) or not (dw_min > 0) or bl < 1:
        raise ConfigError(f"pulse coincidence needs eta ≥ 0, dw_min > 0 and BL ≥ 1 (got eta={eta}, dw_min={dw_min}, BL={bl})")
    base = eta / (bl * dw_min)
    if x_max <= 0 or d_max <= 0:
        r = 1.0
    else:
        r = d_max / x_max
    return math.sqrt(base * r), math.sqrt(base / r)


def _trains(v: Tensor, c: float, bl: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Positive and negative pulse trains (B·BL, n) as 0/1 floats for values v (B, n)."""
    p = (v.abs() * c).clamp_(max=1.0)
    u = torch.rand((v.shape[0], bl, v.shape[1]), generator=gen, dtype=torch.float32, device=v.device)
    fire = u < p.to(torch.float32).unsqueeze(1)
    pos = fire & (v > 0).unsqueeze(1)
    neg = fire & (v < 0).unsqueeze(1)
    shape = (v.shape[0] * bl, v.shape[1])
    return pos.reshape(shape).to(v.dtype), neg.reshape(shape).to(v.dtype)


def coincidences(x: Tensor, d: Tensor, *, bl: int, cx: float, cd: float, generator: torch.Generator) -> Coincidences:
    """Coincidence counts of a batch: rows driven by ``x`` (B, n_in), columns by ``d`` (B, n_out),
    trains of ``bl`` slots at probabilities min(1, cx|x|), min(1, cd|d|). Returns per cell (n_out,
    n_in) the number of coincidences with sign(x_j)·sign(d_i) > 0 (up) and < 0 (down)."""
    if x.ndim != 2 or d.ndim != 2 or x.shape[0] != d.shape[0]:
        raise ConfigError(f"coincidences need (batch, n_in) and (batch, n_out) drives, got {tuple(x.shape)} and {tuple(d.shape)}")
    if bl < 1:
        raise ConfigError(f"BL={bl} must be ≥ 1 (pulse slots per update)")
    xp, xn = _trains(x, cx, bl, generator)
    dp, dn = _trains(d, cd, bl, generator)
    up = dp.T @ xp
    down = dp.T @ xn
    if bool((x < 0).any()) or bool((d < 0).any()):
        up = up.addmm_(dn.T, xn)
        down = down.addmm_(dn.T, xp)
    return Coincidences(up, down)

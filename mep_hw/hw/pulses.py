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

__all__ = ["Coincidences", "coincidences", "coincidences_marginal", "SAMPLINGS", "update_management"]

SAMPLINGS = ("exact", "marginal")


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


def _fires(v: Tensor, c: float, bl: int, gen: torch.Generator) -> Tensor:
    """(B·BL, n) 0/1 pulse trains of the magnitudes |v| at probabilities min(1, c|v|)."""
    p = (v.abs() * c).clamp_(max=1.0).unsqueeze(1)
    u = torch.rand((v.shape[0], bl, v.shape[1]), generator=gen, dtype=v.dtype, device=v.device)
    return torch.lt(u, p, out=u).view(v.shape[0] * bl, v.shape[1])


def coincidences(x: Tensor, d: Tensor, *, bl: int, cx: float, cd: float, generator: torch.Generator,
                 signed: bool | None = None) -> Coincidences:
    """Coincidence counts of a batch: rows driven by ``x`` (B, n_in), columns by ``d`` (B, n_out),
    trains of ``bl`` slots at probabilities min(1, cx|x|), min(1, cd|d|). Returns per cell (n_out,
    n_in) the number of coincidences with sign(x_j)·sign(d_i) > 0 (up) and < 0 (down).
    ``signed=False`` promises x, d ≥ 0 (EP's activities: one product, no sign split); None checks."""
    if x.ndim != 2 or d.ndim != 2 or x.shape[0] != d.shape[0]:
        raise ConfigError(f"coincidences need (batch, n_in) and (batch, n_out) drives, got {tuple(x.shape)} and {tuple(d.shape)}")
    if bl < 1:
        raise ConfigError(f"BL={bl} must be ≥ 1 (pulse slots per update)")
    if signed is None:
        signed = bool((x < 0).any()) or bool((d < 0).any())
    fx, fd = _fires(x, cx, bl, generator), _fires(d, cd, bl, generator)
    if not signed:
        return Coincidences(fd.T @ fx, torch.zeros(d.shape[1], x.shape[1], dtype=x.dtype, device=x.device))
    # sign per train slot: the sign of its line's value (a line fires with the sign of its value)
    sx = torch.sign(x).repeat_interleave(bl, dim=0)
    sd = torch.sign(d).repeat_interleave(bl, dim=0)
    sfx, sfd = fx * sx, fd * sd  # signed trains: +1, −1 or 0 per slot
    net = sfd.T @ sfx  # Σ sign_i sign_j per coincidence = up − down
    total = fd.T @ fx  # up + down
    return Coincidences((total + net) * 0.5, (total - net) * 0.5)


def coincidences_marginal(x: Tensor, d: Tensor, *, bl: int, cx: float, cd: float, generator: torch.Generator) -> Coincidences:
    """The per-cell counts of :func:`coincidences` drawn from their marginal distribution instead
    of from the pulse trains: over a batch a cell's count is a sum of independent
    Binomial(BL, p_bj q_bi), mean μ = BL Σ_b p q and variance BL Σ_b p q (1 − p q), drawn here as
    round(μ + σ·N(0, 1)) clipped at 0 (the normal limit of the Poisson-binomial). Exact in mean and
    variance per cell; it drops the correlation between cells that share a row or column train
    (which one shared train gives them in one time slot). Costs two (B × n) matrix products and
    one normal per cell instead of B·BL Bernoulli draws per line and a (B·BL)-long product."""
    if x.ndim != 2 or d.ndim != 2 or x.shape[0] != d.shape[0]:
        raise ConfigError(f"coincidences need (batch, n_in) and (batch, n_out) drives, got {tuple(x.shape)} and {tuple(d.shape)}")
    if bl < 1:
        raise ConfigError(f"BL={bl} must be ≥ 1 (pulse slots per update)")
    px, pd = (x.abs() * cx).clamp_(max=1.0), (d.abs() * cd).clamp_(max=1.0)
    out = []
    for sx, sd in ((x > 0, d > 0), (x < 0, d > 0), (x > 0, d < 0), (x < 0, d < 0)):
        a, b = px * sx, pd * sd
        if not bool(sx.any()) or not bool(sd.any()):
            out.append(None)
            continue
        mean = b.T @ a
        var = mean - (b * b).T @ (a * a)
        mean, var = mean * bl, var.clamp_(min=0) * bl
        z = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device=mean.device).to(mean.dtype)
        out.append(torch.round(mean + var.sqrt() * z).clamp_(min=0))
    pp, np_, pn, nn_ = out
    zero = torch.zeros(d.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    up = (pp if pp is not None else zero) + (nn_ if nn_ is not None else zero)
    down = (np_ if np_ is not None else zero) + (pn if pn is not None else zero)
    return Coincidences(up, down)

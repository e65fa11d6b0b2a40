"""Tiki-Taka v2 (Gokmen, Front. Artif. Intell. 4:699148, 2021): in-array updates go to a fast
array A; its columns are read periodically into a digital hidden matrix H and transferred to the
slow array C by pulses once |H| passes a threshold; the network reads W = C + γA.

Per weight matrix, with A and C held by tiles of the same card (A programmed to its devices'
symmetry point, the reference against which it is read, so that an asymmetric device's drift
towards its symmetry point acts on A as a leak instead of a bias):

    A ← A + (pulsed outer products of the update)                       every step
    v = read((A − A_sym) e_j)          for columns j of the transfer     every ``every`` steps
    H[:, j] ← H[:, j] + lr_T · v / Δw_C                                  (H in units of C's pulse)
    n = trunc(H[:, j]) clipped to ±max_pulses;  C[:, j] ← n pulses
    H[:, j] ← momentum·n where n ≠ 0 (``forget``, aihwkit's default), else H[:, j] − (1 − momentum)·n

The columns are visited in order, wrapping around. The read of A goes through the periphery
(DAC, read noise, ADC) like any read, against a reference array holding A's symmetry point whose
currents are subtracted before the ADC (zero shifting, Kim et al. 2019; aihwkit's
``subtract_symmetry_point``; the reference is taken as exact). Subtracting the symmetry point
after the ADC instead leaves each cell's rounding error of its symmetry point, up to half an ADC
step (≈ 23 ECRAM pulses), as a constant input to H that every visit transfers to C. H is the only
digital state (the transfer's FLOPs are
counted). aihwkit implements the same recursion as its buffered/chopped transfer compounds
(with chopping off); ``reset_fast`` re-programs the read columns of A to their symmetry point
after a transfer (aihwkit's ``with_reset_prob = 1``), with which, on an ideal symmetric device,
W = C + A follows SGD exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mep_hw.errors import ConfigError

__all__ = ["TransferConfig", "TransferState", "transfer_step"]


class TransferConfig(NamedTuple):
    every: int = 1  # steps between transfers
    columns: int = 0  # columns read per transfer (0: all)
    lr: float = 0.1  # lr_T
    max_pulses: int = 10  # pulses per cell per transfer
    gamma: float = 0.0  # W = C + γA
    reset_fast: bool = False
    momentum: float = 0.0  # the buffer keeps momentum·n after a transfer of n pulses
    forget: bool = False  # reset a transferring cell's buffer (to momentum·n) instead of subtracting


class TransferState(NamedTuple):
    H: Tensor  # (out, n_cols) in units of C's pulse
    next_col: int


def transfer_step(fast, slow, state: TransferState, cfg: TransferConfig, sym: Tensor) -> tuple[TransferState, int]:
    """One transfer from tile ``fast`` (A) to tile ``slow`` (C): read ``cfg.columns`` columns of
    A through the periphery, accumulate into H, pulse C where |H| ≥ 1. ``sym`` is A's symmetry
    point in logical units (out, n_cols). Returns the new state and the host FLOPs spent."""
    out, n_cols = fast.shape
    if slow.shape != fast.shape:
        raise ConfigError(f"tiki-taka: fast array {fast.shape} and slow array {slow.shape} differ")
    k = n_cols if cfg.columns <= 0 else min(cfg.columns, n_cols)
    cols = (torch.arange(k, device=state.H.device) + state.next_col) % n_cols
    E = torch.zeros(k, n_cols, dtype=state.H.dtype, device=state.H.device)
    E[torch.arange(k, device=E.device), cols] = 1.0
    v = fast.mvm_ref(E, sym).T  # (out, k): the columns read against the reference (before the ADC)
    H = state.H.clone()
    h = H[:, cols] + v * (cfg.lr / slow.dw_pulse)
    n = torch.trunc(h).clamp_(-cfg.max_pulses, cfg.max_pulses)
    if cfg.forget:
        H[:, cols] = torch.where(n != 0, n * cfg.momentum, h)
    else:
        H[:, cols] = h - n * (1.0 - cfg.momentum)
    up = torch.zeros(slow.shape, dtype=H.dtype, device=H.device)
    down = torch.zeros_like(up)
    up[:, cols] = n.clamp(min=0)
    down[:, cols] = (-n).clamp(min=0)
    slow.apply_pulses(up, down)
    if cfg.reset_fast:
        cells = torch.zeros(fast.shape, dtype=torch.bool, device=H.device)
        cells[:, cols] = True
        fast.program(sym, cells=cells)
    flops = 5 * out * k  # H += lr·v/Δw (2), trunc, clip, subtract
    return TransferState(H, int((state.next_col + k) % n_cols)), flops

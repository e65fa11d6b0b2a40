"""FLOP counts of the digital host's work per training step (one multiply-add = 2 FLOPs).

Counted operation by operation from the implementations in :mod:`mep_hw.host.updates` and
:mod:`mep_hw.host.linalg`; element-wise operations count one FLOP per element, a square root
or division one FLOP. m × n is a weight matrix with m ≤ n after transposing (Newton–Schulz
works on the short side).

* EP estimate (two phases, ±β or 0/β): ΔW ∝ ρ(s_{l+1})ᵀρ(s_l) in both phases, 2·B·m·n each,
  their difference and the scale, 2·m·n; biases 2·B·m per phase.
* Adam: 12 FLOPs per parameter (moments 3 + 4, bias correction 2, sqrt, eps, division, and the
  lr step 2 — counted on ``adam_direction`` plus the parameter update).
* SGD with momentum: 4 per parameter.
* Newton–Schulz quintic (``newton_schulz5``): normalisation 3mn; per iteration
  A = XXᵀ (2m²n), B = bA + cA² (2m³ + 3m²), X ← aX + BX (2m²n + 2mn).
* Muon (``muon_direction``): momentum and Nesterov 4mn, Newton–Schulz, scale and step 3mn.
* Dion (``dion_direction``, rank r): B = M + G (mn), BQ (2mnr), QR of m × r (Householder,
  2mr² − ⅔r³), R = BᵀP (2mnr), M ← B − (1−μ)PRᵀ (2mnr + mn), column norms and Q (3nr),
  PQᵀ and scale (2mnr + mn), step 2mn.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["ep_estimate_flops", "newton_schulz_flops", "muon_flops", "dion_flops", "host_step_flops"]


def ep_estimate_flops(batch: int, weight_shapes: Sequence[tuple[int, int]], positions: Sequence[int] | None = None) -> int:
    """FLOPs of the host's EP estimate: both phases' outer products, their difference and scale.

    ``positions``: reads of each weight per sample (a convolution's kernel matrix (C_out, C_in·k²)
    is read at every output position, and its outer product sums over them; fc/dense: 1)."""
    total = 0
    for k, (out, inp) in enumerate(weight_shapes):
        p = 1 if positions is None else positions[k]
        total += 2 * (2 * batch * p * out * inp) + 2 * out * inp  # two phases' outer products, difference and scale
        total += 2 * (2 * batch * p * out) + 2 * out  # biases (a conv bias sums over the positions)
    return total


def newton_schulz_flops(m: int, n: int, steps: int = 5) -> int:
    m, n = min(m, n), max(m, n)
    per_iter = 2 * m * m * n + (2 * m**3 + 3 * m * m) + (2 * m * m * n + 2 * m * n)
    return 3 * m * n + steps * per_iter


def muon_flops(m: int, n: int, steps: int = 5) -> int:
    return 4 * m * n + newton_schulz_flops(m, n, steps) + 3 * m * n


def dion_flops(m: int, n: int, rank: int) -> int:
    r = rank
    qr = int(2 * m * r * r - (2 * r**3) / 3)
    return m * n + 2 * m * n * r + qr + 2 * m * n * r + (2 * m * n * r + m * n) + 3 * n * r + (2 * m * n * r + m * n) + 2 * m * n


def host_step_flops(optimizer: str, weight_shapes: Sequence[tuple[int, int]], bias_sizes: Sequence[int],
                    *, rank_frac: float = 0.2, dion_thresh: float = 1e5, ns_steps: int = 5) -> int:
    """FLOPs of one host optimizer step (the training loop's ``--optimizer``) on these parameters."""
    n_bias = sum(bias_sizes)
    n_w = sum(o * i for o, i in weight_shapes)
    if optimizer == "adam":
        return 12 * (n_w + n_bias)
    if optimizer == "sgd":
        return 4 * (n_w + n_bias)
    total = 12 * n_bias  # muon and dion: Adam on the biases
    for o, i in weight_shapes:
        if optimizer == "dion" and o * i > dion_thresh:
            total += dion_flops(o, i, max(1, math.ceil(rank_frac * min(o, i))))
        else:
            total += muon_flops(o, i, ns_steps)
    return total

"""Update rules of the digital host, one function each (DESIGN §4.4): Muon, Dion, Adam,
input-side Fisher whitening. Each takes tensors (and mutates its own state tensors in place)
and returns the update direction; the caller applies −lr × direction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mep_hw.host.linalg import as_matrix, newton_schulz5

__all__ = ["muon_direction", "muon_scale", "dion_direction", "dion_scale", "adam_direction", "whiten"]


def muon_scale(shape) -> float:
    """Muon's shape factor max(1, rows/cols)^½ (Jordan et al. 2024), on the matrix view."""
    rows = shape[0]
    cols = 1
    for n in shape[1:]:
        cols *= n
    return max(1.0, rows / cols) ** 0.5


def muon_direction(grad: Tensor, momentum: Tensor, beta: float = 0.95, nesterov: bool = True, ns_steps: int = 5) -> Tensor:
    """Muon (Jordan et al. 2024): momentum M ← βM + (1−β)G; the direction is NS5 of
    (1−β)G + βM (Nesterov) or of M, times the shape factor; conv filters are flattened."""
    momentum.lerp_(grad, 1.0 - beta)
    u = grad.lerp(momentum, beta) if nesterov else momentum
    d = newton_schulz5(as_matrix(u), steps=ns_steps)
    return d.mul_(muon_scale(grad.shape)).reshape(grad.shape)


def dion_scale(shape) -> float:
    """Dion's shape factor (fan_out / fan_in)^½ (Ahn et al. 2025)."""
    cols = 1
    for n in shape[1:]:
        cols *= n
    return (shape[0] / cols) ** 0.5


def dion_direction(grad: Tensor, momentum: Tensor, Q: Tensor, mu: float = 0.95, eps: float = 1e-8) -> Tensor:
    """Dion (Ahn et al. 2025, Algorithm 1), one warm-started power iteration at rank r = Q.shape[1]:

        B = M + G;  P = orth(B Q) (QR);  R = Bᵀ P;
        M ← B − (1 − μ) P Rᵀ  (error feedback of what the rank-r step leaves out);
        Q ← R / ‖R‖_col;  direction = scale · P Qᵀ

    ``momentum`` (m×n) and ``Q`` (n×r) are updated in place.
    """
    G = as_matrix(grad)
    M = as_matrix(momentum)
    M.add_(G)
    P, _ = torch.linalg.qr(M @ Q)
    R = M.T @ P
    M.addmm_(P, R.T, alpha=-(1.0 - mu))
    Q.copy_(R / (R.norm(dim=0, keepdim=True) + eps))
    return (P @ Q.T).mul_(dion_scale(grad.shape)).reshape(grad.shape)


def adam_direction(
    grad: Tensor, m: Tensor, v: Tensor, step: int, betas=(0.9, 0.999), eps: float = 1e-8
) -> Tensor:
    """Adam (Kingma & Ba 2015) with bias correction; ``m``, ``v`` updated in place."""
    b1, b2 = betas
    m.lerp_(grad, 1.0 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
    mhat = m / (1.0 - b1**step)
    return mhat.div_((v / (1.0 - b2**step)).sqrt_().add_(eps))


def whiten(grad: Tensor, factor: Tensor) -> Tensor:
    """Input-side natural gradient ΔW (E[a aᵀ] + λI)⁻¹ given the Cholesky factor L of
    E[a aᵀ] + λI (Martens & Grosse 2015's input factor; the output factor is taken as I)."""
    G = as_matrix(grad)
    return torch.cholesky_solve(G.T, factor).T.reshape(grad.shape)

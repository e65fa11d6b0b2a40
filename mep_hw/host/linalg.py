"""Digital-host matrix math: orthogonalisation, low-rank power iteration, spectral norms.

Pure tensor functions; the optimizer classes hold state and call them (DESIGN §4.4).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = [
    "NS5_COEFFICIENTS",
    "newton_schulz5",
    "ns5_scalar_map",
    "ns5_max",
    "as_matrix",
    "spectral_norm",
    "coupled_spectral_norm",
    "SpectralEstimate",
]

# Quintic Newton–Schulz coefficients of Jordan et al. (2024, "Muon"): p(x) = ax + bx³ + cx⁵,
# chosen to push singular values in (0, 1] quickly towards 1 (not exactly to 1).
NS5_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def as_matrix(t: Tensor) -> Tensor:
    """View a weight as a matrix: 2-D as is, a conv filter (out, in, kh, kw) as (out, in·kh·kw)."""
    return t if t.ndim == 2 else t.reshape(t.shape[0], -1)


def newton_schulz5(G: Tensor, steps: int = 5, eps: float = 1e-7, coefficients=NS5_COEFFICIENTS) -> Tensor:
    """Approximate orthogonalisation U Vᵀ of G = U Σ Vᵀ by the quintic Newton–Schulz iteration.

    X₀ = G / (‖G‖_F + eps); X ← aX + (bA + cA²)X with A = XXᵀ (on the wide orientation). Every
    singular value σ of X₀ goes through the scalar map p(σ) = aσ + bσ³ + cσ⁵ ``steps`` times
    (:func:`ns5_scalar_map`); with the default coefficients and 5 steps, σ ∈ [1e-3, 1] ends in
    about [0.68, 1.13] (Jordan et al. 2024). Computed in the input dtype.
    """
    a, b, c = coefficients
    X = G / (G.norm() + eps)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    return X.T if tall else X


def ns5_scalar_map(sigma: Tensor, steps: int = 5, coefficients=NS5_COEFFICIENTS) -> Tensor:
    """What :func:`newton_schulz5` does to each singular value of the normalised input."""
    a, b, c = coefficients
    for _ in range(steps):
        sigma = a * sigma + b * sigma**3 + c * sigma**5
    return sigma


def ns5_max(steps: int = 5, coefficients=NS5_COEFFICIENTS) -> float:
    """max over x ∈ [0, 1] of p applied ``steps`` times: a bound on every singular value of
    :func:`newton_schulz5`'s output (its input is normalised to σ ≤ 1). 1.2024 for the defaults."""
    x = torch.linspace(0.0, 1.0, 200001, dtype=torch.float64)
    return float(ns5_scalar_map(x, steps, coefficients).max()) * (1 + 1e-6)


class SpectralEstimate(NamedTuple):
    sigma: float
    vectors: tuple[Tensor, ...]  # right singular vector(s): warm start for the next call
    iterations: int


def _power(apply_gram, v: Sequence[Tensor], max_iters: int, rtol: float) -> SpectralEstimate:
    """Power iteration on a symmetric PSD operator x ↦ Mᵀ M x given as ``apply_gram``.

    σ² is estimated by the Rayleigh quotient ⟨v, MᵀM v⟩ of the unit iterate, whose error
    shrinks like (σ₂/σ₁)^{2k}, twice as fast as that of ‖MᵀM v‖; iteration stops when it changes
    by less than ``rtol`` relatively. The estimate never exceeds σ_max.
    """
    v = [t / _norm(v) for t in v]
    sigma_prev = -1.0
    sigma = 0.0
    for it in range(1, max_iters + 1):
        w = apply_gram(v)
        sigma = max(float(sum((a * b).sum() for a, b in zip(v, w))), 0.0) ** 0.5
        n = _norm(w)
        if n == 0.0:
            return SpectralEstimate(0.0, tuple(v), it)
        v = [t / n for t in w]
        if abs(sigma - sigma_prev) <= rtol * sigma:
            return SpectralEstimate(sigma, tuple(v), it)
        sigma_prev = sigma
    return SpectralEstimate(sigma, tuple(v), max_iters)


def _norm(ts: Sequence[Tensor]) -> float:
    return float(torch.sqrt(sum((t * t).sum() for t in ts)))


def spectral_norm(
    W: Tensor, v0: Tensor | None = None, *, max_iters: int = 2000, rtol: float = 1e-10
) -> SpectralEstimate:
    """σ_max(W) by power iteration, warm-started from ``v0`` (the previous estimate's vector),
    iterated until the Rayleigh estimate changes by less than ``rtol`` relatively.

    Runs in float64 whatever W's dtype (a float32 iterate cannot resolve the small changes of a
    slowly converging estimate), on the Gram matrix of W's smaller side (WWᵀ or WᵀW, formed once,
    so an iteration costs min(m, n)² instead of 2mn). One iteration underestimates σ; this runs
    to convergence (≤ ``max_iters``).
    """
    W = as_matrix(W).double()
    m, n = W.shape
    G = W @ W.T if m <= n else W.T @ W
    if v0 is None or v0.shape[0] != G.shape[0]:
        v0 = torch.ones(G.shape[0], dtype=G.dtype, device=G.device)
    return _power(lambda v: [G @ v[0]], [v0.double()], max_iters, rtol)


def coupled_spectral_norm(
    weights: Sequence[Tensor], v0: Sequence[Tensor] | None = None, *, max_iters: int = 2000, rtol: float = 1e-10
) -> SpectralEstimate:
    """σ_max of the symmetric block-tridiagonal coupling operator of a layered network,

        (𝒲 s)_l = W_{l−1} s_{l−1} + W_lᵀ s_{l+1}

    with ``weights[k]`` coupling state k to state k+1 (shape (n_{k+1}, n_k)). For the layered
    Hopfield network these are the state-to-state weights (the input weights only give a
    constant drive). If ‖𝒲‖ < 1 and ρ is 1-Lipschitz the settle has a unique fixed point;
    per-layer bounds σ(W_l) ≤ γ do not suffice: the coupling can reach 2γ cos(π/(L+1)).
    Runs in float64.
    """
    weights = [as_matrix(w).double() for w in weights]
    sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    if v0 is None:
        v0 = [torch.ones(n, dtype=torch.float64, device=weights[0].device) for n in sizes]
    else:
        v0 = [t.double() for t in v0]

    def apply(v):
        out = [torch.zeros_like(t) for t in v]
        for k, w in enumerate(weights):
            out[k + 1] = out[k + 1] + w @ v[k]
            out[k] = out[k] + w.T @ v[k + 1]
        return out

    return _power(lambda v: apply(apply(v)), list(v0), max_iters, rtol)

"""Host math: Newton–Schulz band, golden Muon and Dion steps, Dion vs its reference, Adam,
whitening, spectral norms vs torch.linalg."""

import math

import pytest
import torch

from mep_hw.host import (
    adam_direction,
    coupled_spectral_norm,
    dion_direction,
    muon_direction,
    newton_schulz5,
    ns5_scalar_map,
    spectral_norm,
    whiten,
)

F64 = torch.float64


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (64, 64), (10, 500)])
def test_newton_schulz_maps_each_singular_value_by_the_quintic(shape):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=g, dtype=F64)
    X = newton_schulz5(G)
    sv_in = torch.linalg.svdvals(G) / (G.norm() + 1e-7)  # X₀ = G / (‖G‖_F + 1e-7)
    expected = ns5_scalar_map(sv_in).sort().values
    got = torch.linalg.svdvals(X).sort().values
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # the band the coefficients promise on the interval actually spanned
    grid = torch.linspace(float(sv_in.min()), 1.0, 20001, dtype=F64)
    band = ns5_scalar_map(grid)
    assert band.min() - 1e-9 <= got.min() and got.max() <= band.max() + 1e-9
    # Jordan et al.: for normalised σ ∈ [1e-3, 1] the output lies in about [0.47, 1.21]
    kept = ns5_scalar_map(sv_in[sv_in >= 1e-3])
    assert 0.47 < kept.min() and kept.max() < 1.21
    # same singular vectors: X = U p(Σ) Vᵀ
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(X, U @ torch.diag(ns5_scalar_map(S / (G.norm() + 1e-7))) @ Vh, rtol=1e-9, atol=1e-10)


def p5(x: float) -> float:
    """The quintic applied five times, written out independently of mep_hw."""
    for _ in range(5):
        x = 3.4445 * x - 4.7750 * x**3 + 2.0315 * x**5
    return x


def test_muon_golden_step():
    # G = diag(3, 4). With a zero buffer, momentum 0.95 and Nesterov the blend is
    # u = G + 0.95(0.05G − G) = 0.0975·G, ‖u‖_F = 0.4875, normalised σ = 0.0975·(3, 4)/(0.4875 + 1e-7);
    # the direction is diag(p⁵(σ₁), p⁵(σ₂)) ≈ diag(0.72288, 1.11920), shape factor 1.
    G = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=F64)
    buf = torch.zeros_like(G)
    d = muon_direction(G, buf, beta=0.95, nesterov=True)
    n = 0.4875 + 1e-7
    expected = torch.diag(torch.tensor([p5(0.2925 / n), p5(0.39 / n)], dtype=F64))
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d, torch.diag(torch.tensor([0.72288, 1.11920], dtype=F64)), rtol=0, atol=1e-5)
    torch.testing.assert_close(buf, 0.05 * G)
    # a tall matrix gets the shape factor √(rows/cols): rank 1, σ = 5/(5 + 1e-7)
    T = torch.tensor([[3.0], [4.0]], dtype=F64)
    d = muon_direction(T, torch.zeros_like(T), beta=0.0, nesterov=False)
    torch.testing.assert_close(d, T / 5.0 * p5(5.0 / (5.0 + 1e-7)) * math.sqrt(2), rtol=1e-12, atol=1e-12)


def test_muon_flattens_conv_filters():
    g = torch.Generator().manual_seed(1)
    G = torch.randn(4, 3, 3, 3, generator=g, dtype=F64)
    d = muon_direction(G, torch.zeros_like(G), beta=0.0, nesterov=False)
    assert d.shape == G.shape
    torch.testing.assert_close(d.reshape(4, 27), newton_schulz5(G.reshape(4, 27)))


def reference_dion(G, M, Q, mu):
    """Algorithm 1 of Ahn et al. (2025), written out independently."""
    B = M + G
    P, _ = torch.linalg.qr(B @ Q)
    R = B.T @ P
    M_new = B - (1 - mu) * P @ R.T
    Q_new = R / (R.norm(dim=0, keepdim=True) + 1e-8)
    return (P @ Q_new.T) * math.sqrt(G.shape[0] / G.shape[1]), M_new, Q_new


@pytest.mark.parametrize("shape,rank", [((8, 6), 6), ((6, 8), 6), ((12, 12), 3)])
def test_dion_matches_its_reference_over_several_steps(shape, rank):
    g = torch.Generator().manual_seed(2)
    Q = torch.randn(shape[1], rank, generator=g, dtype=F64)
    M = torch.zeros(*shape, dtype=F64)
    Qr, Mr = Q.clone(), M.clone()
    for _ in range(4):
        G = torch.randn(*shape, generator=g, dtype=F64)
        d = dion_direction(G, M, Q, mu=0.9)
        dr, Mr, Qr = reference_dion(G, Mr, Qr, 0.9)
        torch.testing.assert_close(d, dr)
        torch.testing.assert_close(M, Mr)
        torch.testing.assert_close(Q, Qr)


def test_dion_golden_single_step_at_full_rank():
    # B = diag(3, 4) with Q = I: P = I (signs from QR), R = B, M ← μB, Q = I, direction = I.
    G = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=F64)
    M, Q = torch.zeros_like(G), torch.eye(2, dtype=F64)
    d = dion_direction(G, M, Q, mu=0.95)
    torch.testing.assert_close(d.abs(), torch.eye(2, dtype=F64), atol=1e-8, rtol=0)
    torch.testing.assert_close(M, 0.95 * G)
    # at full rank the rank-r step misses nothing: momentum keeps exactly μ·B
    g = torch.Generator().manual_seed(3)
    G = torch.randn(5, 4, generator=g, dtype=F64)
    M = torch.randn(5, 4, generator=g, dtype=F64)
    B = M + G
    dion_direction(G, M, torch.randn(4, 4, generator=g, dtype=F64), mu=0.8)
    torch.testing.assert_close(M, 0.8 * B)


def test_adam_direction_equals_torch_adam():
    g = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(7, dtype=F64, generator=g))
    ref = torch.nn.Parameter(p.detach().clone())
    opt = torch.optim.Adam([ref], lr=0.01)
    m, v = torch.zeros(7, dtype=F64), torch.zeros(7, dtype=F64)
    for step in range(1, 6):
        grad = torch.randn(7, dtype=F64, generator=g)
        with torch.no_grad():
            p -= 0.01 * adam_direction(grad, m, v, step)
        ref.grad = grad
        opt.step()
        torch.testing.assert_close(p, ref)


def test_whiten_is_the_damped_inverse_of_the_input_covariance():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(50, 6, generator=g, dtype=F64)
    A = a.T @ a / 50 + 0.1 * torch.eye(6, dtype=F64)
    G = torch.randn(4, 6, generator=g, dtype=F64)
    torch.testing.assert_close(whiten(G, torch.linalg.cholesky(A)), G @ torch.linalg.inv(A))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-7), (torch.float32, 1e-6)])
def test_spectral_norm_matches_torch(dtype, tol):
    for seed in range(5):
        W = torch.randn(40, 60, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        ref = float(torch.linalg.matrix_norm(W.double(), 2))  # the float64 norm of the stored W
        est = spectral_norm(W)
        assert est.sigma <= ref * (1 + tol) and abs(est.sigma - ref) / ref < tol, (est.sigma, ref)
        # warm start from the previous vector converges at once
        assert spectral_norm(W, est.vectors[0]).iterations <= 3


def test_coupled_spectral_norm_is_the_norm_of_the_block_operator():
    g = torch.Generator().manual_seed(6)
    ws = [torch.randn(8, 6, generator=g, dtype=F64) * 0.3, torch.randn(5, 8, generator=g, dtype=F64) * 0.3,
          torch.randn(4, 5, generator=g, dtype=F64) * 0.3]
    sizes = [6, 8, 5, 4]
    off = [0, 6, 14, 19, 23]
    M = torch.zeros(23, 23, dtype=F64)
    for k, w in enumerate(ws):
        M[off[k + 1] : off[k + 2], off[k] : off[k + 1]] = w
        M[off[k] : off[k + 1], off[k + 1] : off[k + 2]] = w.T
    est = coupled_spectral_norm(ws)
    assert abs(est.sigma - float(torch.linalg.matrix_norm(M, 2))) < 1e-8
    # per-layer bounds do not bound the chain: σ(W_l) = γ for all l gives 2γ cos(π/(L+1)) > γ
    eye = [torch.eye(3, dtype=F64) * 0.9 for _ in range(4)]
    chain = coupled_spectral_norm(eye).sigma
    assert abs(chain - 2 * 0.9 * math.cos(math.pi / 6)) < 1e-8 and chain > 0.9
    assert sizes  # layer widths of the chain above

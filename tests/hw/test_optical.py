"""Optical MZI meshes: Clements round trip, passivity, the ideal limit, non-idealities."""

import math

import pytest
import torch

from mep_hw.errors import ConfigError
from mep_hw.hw import IdealDevice, OpticalMZI, Periphery, Tile, clements_decompose, clements_reconstruct
from mep_hw.hw.optical import mesh_schedule

F64 = torch.float64


def unitary(nb, n, seed, real=False):
    g = torch.Generator().manual_seed(seed)
    if real:
        return torch.linalg.qr(torch.randn(nb, n, n, generator=g, dtype=F64))[0].to(torch.complex128)
    a = torch.randn(nb, n, n, generator=g, dtype=F64) + 1j * torch.randn(nb, n, n, generator=g, dtype=F64)
    return torch.linalg.qr(a)[0]


@pytest.mark.parametrize("n", [2, 3, 4, 7, 12])
@pytest.mark.parametrize("real", [False, True])
def test_clements_round_trip_in_float64(n, real):
    U = unitary(3, n, seed=n, real=real)
    mesh = clements_decompose(U)
    assert mesh.modes.numel() == n * (n - 1) // 2
    assert float((clements_reconstruct(mesh, n) - U).abs().max()) < 1e-10
    cols, _ = mesh_schedule(n)
    assert max(cols) + 1 == (n if n > 2 else 1)  # the rectangular mesh: depth N (one MZI for N = 2)


def test_the_ideal_mesh_realises_the_weights_and_is_passive():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(10, 14, generator=g, dtype=F64) * 0.3
    mzi = Tile(OpticalMZI(mesh_size=16), Periphery(), W, seed=0)
    ideal = Tile(IdealDevice(), Periphery(), W, seed=0)
    assert float((mzi.held() - ideal.held()).abs().max()) < 1e-10
    # the mapping makes every singular value ≤ 1: attenuators are passive
    w_norm = mzi.held() / mzi.w_scale
    assert float(torch.linalg.matrix_norm(w_norm, 2)) <= 1.0 + 1e-12
    # a target beyond the attenuators' reach is clipped at σ = 1
    dev = OpticalMZI(mesh_size=16)
    st = dev.program(None, torch.eye(4, dtype=F64) * 3.0, torch.Generator())
    assert float(torch.linalg.matrix_norm(dev.mean(st), 2)) == pytest.approx(1.0, abs=1e-12)


def test_tiled_meshes_realise_large_matrices():
    W = torch.randn(20, 37, generator=torch.Generator().manual_seed(2), dtype=F64)
    t = Tile(OpticalMZI(mesh_size=8), Periphery(), W, seed=0)
    assert float((t.held() - W).abs().max()) < 1e-10


def test_phase_quantisation_error_shrinks_with_bits():
    W = torch.randn(12, 12, generator=torch.Generator().manual_seed(3), dtype=F64) * 0.3
    errs = []
    for bits in (4, 6, 8, 10, 12):
        t = Tile(OpticalMZI(mesh_size=12, phase_bits=bits), Periphery(), W, seed=0)
        errs.append(float((t.held() - W).abs().max()))
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 0.01 * float(W.abs().max())


def test_noise_and_crosstalk_perturb_and_are_reproducible():
    W = torch.randn(8, 8, generator=torch.Generator().manual_seed(4), dtype=F64) * 0.3
    for dev in (OpticalMZI(mesh_size=8, phase_noise_rad=0.01), OpticalMZI(mesh_size=8, crosstalk=0.02)):
        a = Tile(dev, Periphery(), W, seed=5).held()
        b = Tile(dev, Periphery(), W, seed=5).held()
        assert torch.equal(a, b)
        assert 1e-6 < float((a - W).abs().max()) < 0.2


def test_detector_noise_grows_with_insertion_loss():
    y = torch.ones(4, dtype=F64)
    lossless = OpticalMZI(mesh_size=16, det_thermal_noise=0.01, shot_noise=0.02)
    lossy = OpticalMZI(mesh_size=16, det_thermal_noise=0.01, shot_noise=0.02, insertion_loss_dB=0.1)
    L2 = 10 ** (-16 * 0.1 / 10)  # power transmission of one 16-mode mesh
    torch.testing.assert_close(lossless.output_noise_var(y), torch.full((4,), 0.02**2 + 0.01**2, dtype=F64))
    torch.testing.assert_close(lossy.output_noise_var(y), torch.full((4,), 0.02**2 / L2 + 0.01**2 / L2**2, dtype=F64))


def test_bad_fields():
    with pytest.raises(ConfigError, match="mesh_size=1 is out of range"):
        OpticalMZI(mesh_size=1)
    with pytest.raises(ConfigError, match=r"insertion_loss_dB=-1.0 is out of range: expected a number in \[0, 3.0\]"):
        OpticalMZI(insertion_loss_dB=-1.0)
    assert math.isfinite(OpticalMZI().scale_of(torch.eye(3)))


def test_an_update_counts_the_phase_settings_of_the_blocks_it_changes():
    from mep_hw.hw import load_card

    dev = load_card("mzi").device  # 16-mode meshes: a 20 × 40 matrix is 2 × 3 blocks
    gen = torch.Generator().manual_seed(0)
    st = dev.program(None, torch.zeros(20, 40, dtype=torch.float64), gen)
    dw = torch.zeros(20, 40, dtype=torch.float64)
    dw[0, 0] = dw[17, 39] = 0.01  # blocks (0, 0) and (1, 2)
    _, counts = dev.update(st, dw, gen)
    N = 16
    assert counts.pulses_up == 2 * (2 * N * (N - 1) + N) and counts.pulses_down == 0
    _, none = dev.update(st, torch.zeros_like(dw), gen)
    assert none.pulses_up == 0

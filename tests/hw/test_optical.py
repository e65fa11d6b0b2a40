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
    for dev in (OpticalMZI(mesh_size=8, phase_noise_rad=0.01), OpticalMZI(mesh_size=8, crosstalk=0.02, crosstalk_residual=0.1)):
        a = Tile(dev, Periphery(), W, seed=5).held()
        b = Tile(dev, Periphery(), W, seed=5).held()
        assert torch.equal(a, b)
        assert 1e-6 < float((a - W).abs().max()) < 0.2


def test_crosstalk_acts_on_the_physical_phases_and_calibration_reduces_it():
    """The heaters hold wrapped phases: adding 2π to a decomposed phase changes nothing, and the
    calibrated residual scales the error (the issue: raw phases of −6 … 9 rad doubled it)."""
    from mep_hw.hw.optical import Mesh

    dev = OpticalMZI(mesh_size=8, crosstalk=0.01)
    mesh = clements_decompose(unitary(1, 8, seed=9))
    shifted = Mesh(mesh.modes, mesh.theta, mesh.phi + 2 * math.pi * torch.randint(-2, 3, mesh.phi.shape, generator=torch.Generator().manual_seed(1)), mesh.diag)
    torch.testing.assert_close(dev._realise(mesh, 8, None), dev._realise(shifted, 8, None), atol=1e-6, rtol=0)
    W = torch.randn(16, 16, generator=torch.Generator().manual_seed(6), dtype=F64) * 0.3
    errs = [float((Tile(OpticalMZI(mesh_size=16, crosstalk=0.01, crosstalk_residual=r), Periphery(), W, seed=0).held() - W).norm() / W.norm())
            for r in (1.0, 0.1)]
    assert errs[1] < 0.2 * errs[0]


def test_detector_noise_grows_with_insertion_loss():
    """Coherent detection: LO shot noise and thermal noise, independent of the signal, referred
    through the field transmission of two meshes: variance (shot² + thermal²)/T⁴."""
    y = torch.tensor([0.0, 0.5, -2.0, 3.0], dtype=F64)
    lossless = OpticalMZI(mesh_size=16, det_thermal_noise=0.01, shot_noise=0.02)
    lossy = OpticalMZI(mesh_size=16, det_thermal_noise=0.01, shot_noise=0.02, insertion_loss_dB=0.1)
    T4 = (10 ** (-16 * 0.1 / 20)) ** 4  # (10^(−N·IL/20))⁴
    torch.testing.assert_close(lossless.output_noise_var(y), torch.full((4,), 0.02**2 + 0.01**2, dtype=F64))
    torch.testing.assert_close(lossy.output_noise_var(y), torch.full((4,), (0.02**2 + 0.01**2) / T4, dtype=F64))
    with pytest.raises(ConfigError, match="detection='direct' is not valid"):
        OpticalMZI(detection="direct")


def test_detector_noise_reaches_the_output_with_ideal_converters():
    """The issue: with dac_bits = adc_bits = 0 the tile took its exact shortcut and dropped it."""
    dev = OpticalMZI(mesh_size=8, det_thermal_noise=0.03, shot_noise=0.04, insertion_loss_dB=0.05)
    W = torch.randn(8, 8, generator=torch.Generator().manual_seed(7), dtype=F64) * 0.3
    t = Tile(dev, Periphery(), W, seed=0)
    assert not t.exact
    n = 20_000
    x = torch.rand(1, 8, generator=torch.Generator().manual_seed(8), dtype=F64).expand(n, 8)
    y = t.mvm(x)
    sd = math.sqrt(float(dev.output_noise_var(torch.zeros(1, dtype=F64)))) * t.w_scale
    assert abs(float((y - x[:1] @ t.held().T).std()) / sd - 1) < 0.05
    # and the settle's noise floor counts it
    assert t.noise_rms_out(0.5, 8) == pytest.approx(sd, rel=1e-9)


def test_holding_power_is_p_pi_per_radian_of_every_heater():
    dev = OpticalMZI(mesh_size=4, p_pi_W=0.025)
    st = dev.program(None, torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=F64) * 0.2, torch.Generator())
    from mep_hw.hw.optical import physical_phases

    phases = sum(float(v.sum()) for m in (st.u_mesh, st.v_mesh) for v in physical_phases(m))
    phases += float((2 * torch.arccos(st.sigma)).sum())
    assert dev.static_power_W(st) == pytest.approx(0.025 * phases / math.pi)
    for m in (st.u_mesh, st.v_mesh):
        two_theta, phi, out = physical_phases(m)
        assert float(two_theta.min()) >= 0 and float(two_theta.max()) <= math.pi + 1e-12
        assert float(phi.min()) >= 0 and float(phi.max()) < 2 * math.pi and float(out.max()) < 2 * math.pi


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
    N = 16  # θ and φ of both meshes' MZIs, both output phase screens, the attenuators
    assert counts.pulses_up == 2 * (2 * N * (N - 1) + 2 * N + N) and counts.pulses_down == 0
    _, none = dev.update(st, torch.zeros_like(dw), gen)
    assert none.pulses_up == 0

"""Crossbar physics against the sources' equations: programming, read noise and drift statistics
(Nandakumar 2019 / aihwkit PCMLikeNoiseModel), per-pulse statistics (NeuroSim, aihwkit), n pulses
at once vs single pulses, symmetry points, stuck cells, refresh, ideal limit."""

import math

import pytest
import torch

from mep_hw.errors import ConfigError, DeviceError
from mep_hw.hw import CrossbarDevice, FixedPointDevice, IdealDevice, NoiseBank, Periphery, Tile, neurosim_a, quantize
from mep_hw.hw.crossbar import _Dev, monotone_curve, pcm_drift_nu, pcm_read_qs

F64 = torch.float64
N = 200_000  # samples for the statistics tests
TOL = 0.05  # the tolerance for means and standard deviations


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def state_of(dev, shape=(N,), seed=0, dtype=F64):
    return dev.init_state(shape, gen(seed), dtype, "cpu")


def close(x, y, rel):
    return abs(x - y) <= rel * abs(y)


def single_pulse(dev, g0, up, seed, n=N):
    """One pulse on n fresh devices (no device-to-device spread) at conductance g0 (µS)."""
    g = torch.full((n,), g0, dtype=F64)
    one = torch.ones(n, dtype=F64)
    q = dev._prep(_Dev(one * dev.g_max_uS, one, one * 0.0, torch.zeros(n, dtype=torch.int64)))
    return dev.pulse(g, up, q, gen(seed))


# ----------------------------------------------------------------------------- programming
def test_pcm_programming_noise_follows_the_polynomial():
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=25.0, prog_noise_model="pcm", prog_noise=1.0, update_mode="unidirectional")
    for w in (0.2, 0.5, 0.8):
        st = dev.program(state_of(dev), torch.full((N,), w, dtype=F64), gen(1))
        g = w * 25.0
        expected = 0.26348 + 1.9650 * w - 1.1731 * w * w  # µS at g_max = 25 µS (Nandakumar 2019)
        assert close(float(st.gp.std()), expected, 0.01), (w, float(st.gp.std()), expected)
        assert abs(float(st.gp.mean()) - g) < 4 * expected / math.sqrt(N)
    # scaled to another g_max: sigma × g_max/25
    dev50 = CrossbarDevice(g_min_uS=0.0, g_max_uS=50.0, prog_noise_model="pcm", prog_noise=1.0, update_mode="unidirectional")
    st = dev50.program(state_of(dev50), torch.full((N,), 0.5, dtype=F64), gen(2))
    assert close(float(st.gp.std()), (0.26348 + 1.9650 * 0.5 - 1.1731 * 0.25) * 2, 0.01)
    # aihwkit clips programmed PCM conductances at 0 only: at the top the spread is the full polynomial
    st = dev.program(state_of(dev), torch.full((N,), 1.0, dtype=F64), gen(3))
    assert close(float(st.gp.std()), 0.26348 + 1.9650 - 1.1731, TOL) and float(st.gp.max()) > 25.0


def test_relative_programming_noise_is_truncated_at_the_device_bounds():
    dev = CrossbarDevice(g_min_uS=1.0, g_max_uS=11.0, prog_noise_model="relative", prog_noise=0.02)
    st = dev.program(state_of(dev), torch.full((N,), 0.3, dtype=F64), gen(3))
    assert close(float(st.gp.std()), 0.02 * 10.0, 0.01)
    # programmed to the top: min(N(g_max, σ), g_max), a clipped normal: mean g_max − σ/√(2π),
    # std σ·√(½ − 1/(2π)) (−42 %), half of the devices exactly at g_max
    st = dev.program(state_of(dev), torch.full((N,), 1.0, dtype=F64), gen(4))
    sig = 0.2
    assert close(float(11.0 - st.gp.mean()), sig / math.sqrt(2 * math.pi), TOL)
    assert close(float(st.gp.std()), sig * math.sqrt(0.5 - 1 / (2 * math.pi)), TOL)
    assert abs(float((st.gp == 11.0).double().mean()) - 0.5) < 0.01


def test_levels_are_pulse_positions_on_the_response_curve():
    lin = CrossbarDevice(g_min_uS=1.0, g_max_uS=11.0, levels=6, response="linear")  # 5 pulses of 2 µS
    st = lin.program(state_of(lin, (1000,)), torch.linspace(-1, 1, 1000, dtype=F64), gen(4))
    assert set(torch.unique(st.gp).round(decimals=9).tolist()) <= {1.0, 3.0, 5.0, 7.0, 9.0, 11.0}
    # NeuroSim: states uniform in pulse number on the nonlinear curve, not uniform in G
    exp_ = CrossbarDevice(g_min_uS=0.0, g_max_uS=1.0, levels=11, response="exponential", nl_ltp=2.4, nl_ltd=-4.88)
    st = exp_.program(state_of(exp_, (2001,)), torch.linspace(-1, 1, 2001, dtype=F64), gen(5))
    A = 0.499181 * 10  # NeuroSim getParamA(2.40) × P_max
    B = 1.0 / (1 - math.exp(-10 / A))
    grid = torch.tensor([B * (1 - math.exp(-k / A)) for k in range(11)], dtype=F64)
    held = torch.unique(st.gp)
    assert held.numel() == 11 and float((held - grid).abs().max()) < 1e-4  # the table's A vs the formula: 5e-5


def test_programming_noise_survives_on_quantised_cards():
    # programming noise leaves G off the grid; a write too small for a pulse does not snap it back
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=25.0, levels=16, prog_noise_model="pcm", prog_noise=1.0)
    st = dev.program(state_of(dev), torch.full((N,), 0.4, dtype=F64), gen(30))
    off = st.gp - dev._quantise(st.gp.clone(), st.gmax_p, st.curve_p)
    assert float(off.abs().max()) > 0.1
    new, c = dev.update(st, torch.full((N,), 1e-3, dtype=F64), gen(31))  # < half a pulse: 0 pulses
    assert int(c.pulses_up) == int(c.pulses_down) == 0
    assert torch.equal(new.gp, st.gp) and torch.equal(new.gm, st.gm)


@pytest.mark.parametrize("card", ["reram_taox", "reram_agsi", "fefet", "reram_agsi_measured"])
def test_quantised_cards_keep_their_pulse_noise(card):
    """Each pulse adds NeuroSim's cycle-to-cycle noise, σ = c2c × range, and the conductance stays
    continuous (the issue: rounding to the level grid erased it)."""
    from mep_hw.hw import load_card

    dev = load_card(card).device
    mid = 0.5 * (dev.g_min_uS + dev.g_max_uS)
    for up in (True, False):
        g1 = single_pulse(dev, mid, up, seed=7 + up)
        assert close(float(g1.std()), dev.dw_ctoc * dev.g_range, TOL), (card, up, float(g1.std()))
        assert torch.unique(g1).numel() > N // 2  # continuous, not snapped to a grid


# ----------------------------------------------------------------------------- reading
def test_constant_read_noise_is_resampled_and_has_its_std():
    dev = CrossbarDevice(read_noise=0.01)
    st = dev.program(state_of(dev, (8,)), torch.full((8,), 0.25, dtype=F64), gen(5))
    bank = NoiseBank(7, size=1 << 20, dtype=F64)
    reads = torch.stack([dev.read(st, bank) for _ in range(N // 8)])  # (reads, cells)
    assert close(float(reads.std()), math.sqrt(2) * 0.01, 0.01)  # two devices per weight
    assert abs(float(reads.mean()) - 0.25) < 4 * 0.0142 / math.sqrt(reads.numel())
    r = reads - reads.mean(0)
    corr = float((r[1:] * r[:-1]).mean() / r.var())
    assert abs(corr) < 0.01


@pytest.mark.parametrize("g_rel", [0.02, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("t_s", [0.0, 3600.0, 3.15e7])
def test_pcm_read_noise_follows_the_1_over_f_model(g_rel, t_s):
    """σ(G, t) = |G(t)|·Q_s(g)·√ln((t + t₀ + t_read)/(2 t_read)) per device and read (Nandakumar
    2019; aihwkit PCMLikeNoiseModel.apply_drift_noise_to_conductance)."""
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=25.0, update_mode="unidirectional", read_noise_model="pcm", read_noise=1.0,
                         t_read_s=250e-9, drift_model="pcm")
    st = dev.advance(dev.program(state_of(dev), torch.full((N,), g_rel, dtype=F64), gen(6)), t_s)
    gp = dev.physical(st)["g_plus"][0]
    qs = min(0.0088 / max(g_rel**0.65, 1e-3), 0.2)
    sig = gp * qs * math.sqrt(math.log((t_s + 20.0 + 250e-9) / (2 * 250e-9)))  # per device, µS
    reads = dev.read(st, NoiseBank(8, size=1 << 20, dtype=F64)) * 25.0 - gp  # G⁻ = 0: no noise
    assert close(float(reads.std()), float(sig.square().mean().sqrt()), TOL)
    assert abs(float(reads.mean())) < 5 * float(sig.mean()) / math.sqrt(N)
    assert torch.allclose(dev.read_std(st) * 25.0, sig)
    assert float(pcm_read_qs(torch.tensor([g_rel]))) == pytest.approx(qs)


def folded_normal_moments(mu, sd):
    a = mu / sd
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    big_phi = 0.5 * math.erfc(a / math.sqrt(2))  # Φ(−a)
    m = sd * math.sqrt(2 / math.pi) * math.exp(-a * a / 2) + mu * (1 - 2 * big_phi)
    return m, math.sqrt(mu * mu + sd * sd - m * m), phi


@pytest.mark.parametrize("g_rel", [0.02, 0.1, 0.5])
def test_pcm_drift_exponent_depends_on_the_programmed_conductance(g_rel):
    """ν = |N(μ(g), σ(g))| (Nandakumar 2019): 0.060 ± 0.023 at 0.1·g_max, 0.086 ± 0.041 at 0.02."""
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=25.0, update_mode="unidirectional", drift_model="pcm")
    st = dev.program(state_of(dev), torch.full((N,), g_rel, dtype=F64), gen(9))
    lg = math.log(g_rel)
    mu = min(max(-0.0155 * lg + 0.0244, 0.049), 0.1)
    sd = min(max(-0.0125 * lg - 0.0059, 0.008), 0.045)
    m, s, _ = folded_normal_moments(mu, sd)
    assert close(float(st.nu_p.mean()), m, TOL) and close(float(st.nu_p.std()), s, TOL)
    mu_t, sd_t = pcm_drift_nu(torch.tensor([g_rel]))
    assert float(mu_t) == pytest.approx(mu) and float(sd_t) == pytest.approx(sd)


@pytest.mark.parametrize("g_rel", [0.02, 0.1, 0.5])
@pytest.mark.parametrize("t_s", [3600.0, 86400.0, 3.15e7])
def test_pcm_drift_mean_conductance(g_rel, t_s):
    """E[G(t)] = G₀ E[((t + t₀)/t₀)^(−ν)] over the folded-normal ν (quadrature)."""
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=25.0, update_mode="unidirectional", drift_model="pcm")
    st = dev.advance(dev.program(state_of(dev), torch.full((N,), g_rel, dtype=F64), gen(10)), t_s)
    g = dev.physical(st)["g_plus"][0]
    lg = math.log(g_rel)
    mu = min(max(-0.0155 * lg + 0.0244, 0.049), 0.1)
    sd = min(max(-0.0125 * lg - 0.0059, 0.008), 0.045)
    x = torch.linspace(-8, 8, 20001, dtype=F64)
    w = torch.exp(-x * x / 2)
    nu = (mu + sd * x).abs()
    ratio = float((w * ((t_s + 20) / 20) ** (-nu)).sum() / w.sum())
    assert close(float(g.mean()), 25.0 * g_rel * ratio, TOL / 5)
    assert close(float(g.std()), float(25.0 * g_rel * ((w * ((t_s + 20) / 20) ** (-2 * nu)).sum() / w.sum() - ratio**2) ** 0.5), TOL)


@pytest.mark.parametrize("t_s", [86400.0, 3.15e7])
def test_pcm_drift_exponent_is_drawn_at_the_target_not_the_written_conductance(t_s):
    """aihwkit PCMLikeNoiseModel draws ν from g_target (generate_drift_coefficients(g_target)),
    independent of the programming noise: at 0.02·g_max with the card's programming noise,
    E[G(t)] = E[max(G_T + σ(G_T)ξ, 0)]·E[x^(−|N(μ(g_T), σ(g_T))|)], x = (t + t₀)/t₀ (the former
    draw from the written G gave the devices programmed high a small ν: E[G(1 yr)] 3 % high,
    0.181 vs 0.176 µS, and E[ν] 0.0871 vs 0.0858)."""
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=25.0, update_mode="unidirectional", drift_model="pcm",
                         prog_noise_model="pcm", prog_noise=1.0)
    g_rel = 0.02
    st = dev.program(state_of(dev), torch.full((N,), g_rel, dtype=F64), gen(40))
    lg = math.log(g_rel)
    mu = min(max(-0.0155 * lg + 0.0244, 0.049), 0.1)
    sd = min(max(-0.0125 * lg - 0.0059, 0.008), 0.045)
    m, s, _ = folded_normal_moments(mu, sd)
    assert close(float(st.nu_p.mean()), m, TOL / 5) and close(float(st.nu_p.std()), s, TOL)
    assert abs(float(torch.corrcoef(torch.stack([st.gp, st.nu_p]))[0, 1])) < 5 / math.sqrt(N)  # independent
    g_t = 25.0 * g_rel
    sig = float(dev.prog_sigma(torch.tensor(g_t, dtype=F64)))  # 0.30 µS at 0.5 µS
    a = g_t / sig
    e_prog = g_t * 0.5 * math.erfc(-a / math.sqrt(2)) + sig * math.exp(-a * a / 2) / math.sqrt(2 * math.pi)  # E[max(X, 0)]
    L = math.log((t_s + 20.0) / 20.0)  # E[e^(−L|Z|)], Z ~ N(μ, σ): the two half-lines in closed form
    e_drift = (math.exp(-L * mu + (L * sd) ** 2 / 2) * 0.5 * math.erfc(-(mu - L * sd * sd) / (sd * math.sqrt(2)))
               + math.exp(L * mu + (L * sd) ** 2 / 2) * 0.5 * math.erfc((mu + L * sd * sd) / (sd * math.sqrt(2))))
    g = dev.physical(dev.advance(st, t_s))["g_plus"][0]
    se = float(g.std()) / math.sqrt(N)
    assert close(float(st.gp.mean()), e_prog, TOL / 5)
    assert abs(float(g.mean()) - e_prog * e_drift) < 5 * se
    assert close(float(g.mean()), e_prog * e_drift, 0.01)


def test_constant_drift_power_law():
    dev = CrossbarDevice(drift_nu_mean=0.05, drift_nu_std=0.0, drift_t0_s=20.0, update_mode="unidirectional")
    st = dev.program(state_of(dev, (10,)), torch.full((10,), 0.8, dtype=F64), gen(9))
    g0 = st.gp.clone()
    for t in (0.0, 20.0, 3600.0, 86400.0):
        g = dev.physical(dev.advance(st, t))["g_plus"][0]
        torch.testing.assert_close(g, g0 * ((t + 20.0) / 20.0) ** -0.05)
    spread = CrossbarDevice(drift_nu_mean=0.05, drift_nu_std=0.01)
    st = state_of(spread)
    assert close(float(st.nu_p.mean()), 0.05, 0.01) and close(float(st.nu_p.std()), 0.01, 0.02)


def test_mvm_noise_is_read_noise_times_the_input_norm_plus_output_noise():
    dev = CrossbarDevice(read_noise=0.01)
    W = torch.randn(4, 64, generator=gen(6), dtype=F64) * 0.3
    tile = Tile(dev, Periphery(out_noise=0.05), W, seed=0, noise=NoiseBank(8, dtype=F64))
    x = torch.rand(1, 64, generator=gen(7), dtype=F64).expand(N // 4, 64)
    y = tile.mvm(x)
    exact = x[:1] @ tile.held().T
    sigma = math.sqrt((2 * 0.01**2) * float((x[0] ** 2).sum()) + 0.05**2) * tile.w_scale
    assert close(float((y - exact).std()), sigma, 0.02)
    assert float((y - exact).mean(0).abs().max()) < 5 * sigma / math.sqrt(N // 4)
    yt = tile.mvm_t(torch.ones(N // 64, 4, dtype=F64))  # the transpose read: same cells
    sigma_t = math.sqrt(2 * 0.01**2 * 4 + 0.05**2) * tile.w_scale
    assert close(float((yt - torch.ones(1, 4, dtype=F64) @ tile.held()).std()), sigma_t, 0.02)


# ----------------------------------------------------------------------------- one pulse
# NeuroSim getParamA table entries (A / P_max, MLP+NeuroSim V3.0 formula.cpp), signed by the label
NS_A = {2.4: 0.499181, -4.88: -0.200303, 0.04: 31.566827, -0.63: -2.063266}


def neurosim_next(g, P, A_rel, g_min, g_max, n):
    """NeuroSim RealDevice::Write without noise: x = InvNonlinearWeight(G), G' = NonlinearWeight(x + n)."""
    A = A_rel * P
    B = (g_max - g_min) / (1 - math.exp(-P / A))
    x = -A * math.log(1 - (g - g_min) / B)
    return B * (1 - math.exp(-(x + n) / A)) + g_min


@pytest.mark.parametrize("nl_ltp,nl_ltd", [(2.4, -4.88), (0.04, -0.63)])
@pytest.mark.parametrize("frac", [0.2, 0.5, 0.8])
def test_exponential_pulse_matches_neurosim_per_pulse(nl_ltp, nl_ltd, frac):
    """Mean: NeuroSim's NonlinearWeight(InvNonlinearWeight(G) ± 1); std: sigmaCtoC = c2c × range."""
    g_min, g_max = 1.0, 11.0
    dev = CrossbarDevice(g_min_uS=g_min, g_max_uS=g_max, levels=98, levels_down=101, response="exponential",
                         nl_ltp=nl_ltp, nl_ltd=nl_ltd, c2c_model="range", dw_ctoc=0.035)
    g0 = g_min + frac * (g_max - g_min)
    up = single_pulse(dev, g0, True, seed=11)
    dn = single_pulse(dev, g0, False, seed=12)
    m_up = neurosim_next(g0, 97, NS_A[nl_ltp], g_min, g_max, 1)
    m_dn = neurosim_next(g0, 100, NS_A[nl_ltd], g_min, g_max, -1)
    sig = 0.035 * 10.0
    se = sig / math.sqrt(N)
    assert abs(float(up.mean()) - m_up) < 5 * se + 2e-4 * abs(m_up - g0)  # table A vs formula: 5e-5
    assert abs(float(dn.mean()) - m_dn) < 5 * se + 2e-4 * abs(m_dn - g0)
    assert close(float(up.std()), sig, TOL) and close(float(dn.std()), sig, TOL)
    quiet = CrossbarDevice(**{**{f: getattr(dev, f) for f in ("g_min_uS", "g_max_uS", "levels", "levels_down", "response",
                                                               "nl_ltp", "nl_ltd")}})
    for n in (1, 5, 40):  # without noise, n single pulses follow the closed form exactly
        g = torch.full((1,), g0, dtype=F64)
        st = quiet.init_state((1,), gen(0), F64, "cpu")._replace(gp=g.clone(), gm=torch.full((1,), g_min, dtype=F64))
        st, _ = quiet.apply_pulses(st, torch.tensor([float(n)], dtype=F64), torch.zeros(1, dtype=F64), gen(1))
        expected = min(neurosim_next(g0, 97, NS_A[nl_ltp], g_min, g_max, n), g_max)  # NeuroSim clips at maxConductance
        assert float(st.gp) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9, 0.99])
def test_soft_bounds_multiplicative_noise_matches_aihwkit(frac):
    """aihwkit SoftBounds (LinearStep, γ = 1, mult_noise): ΔG↑ = dw_min (1 − (G − G_ref)/(g_max −
    G_ref))(1 + σξ), so the noise vanishes at the bound (the issue: σ·Δg·√n everywhere)."""
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=10.0, dw_min_uS=0.05, response="soft_bounds", c2c_model="multiplicative", dw_ctoc=0.3)
    g0 = 10.0 * frac
    up = single_pulse(dev, g0, True, seed=13) - g0
    dn = g0 - single_pulse(dev, g0, False, seed=14)
    ref = 5.0
    m_up = 0.05 * (1 - (g0 - ref) / (10.0 - ref))
    m_dn = 0.05 * (1 - (ref - g0) / ref)
    assert close(float(up.mean()), m_up, TOL) and close(float(up.std()), 0.3 * m_up, TOL)
    assert close(float(dn.mean()), m_dn, TOL) and close(float(dn.std()), 0.3 * m_dn, TOL)


@pytest.mark.parametrize("frac", [0.2, 0.6, 0.95])
def test_linear_step_and_pow_step_match_aihwkit(frac):
    """LinearStep: ΔG↑ = s(1 − γ↑ (G − G_ref)/(g_max − G_ref)), |ΔG↓| = s(1 − γ↓ (G_ref − G)/(G_ref − g_min));
    PowStep: ΔG↑ = s ω^γ↑, |ΔG↓| = s (1 − ω)^γ↓ with ω = (g_max − G)/R; additive noise σ·s."""
    ls = CrossbarDevice(g_min_uS=0.0, g_max_uS=1.0, dw_min_uS=0.002, response="linear_step", gamma_up=0.1153,
                        gamma_down=0.5085, step_ref_frac=0.4138, c2c_model="additive", dw_ctoc=0.3)
    g0 = frac
    ref = 0.4138
    for up, m in ((True, 0.002 * (1 - 0.1153 * (g0 - ref) / (1 - ref))), (False, 0.002 * (1 - 0.5085 * (ref - g0) / ref))):
        d = (single_pulse(ls, g0, up, seed=15) - g0).abs()
        assert close(float(d.mean()), m, TOL / 5) and close(float(d.std()), 0.3 * 0.002, TOL)
    ps = CrossbarDevice(g_min_uS=0.0, g_max_uS=1.0, dw_min_uS=0.002, response="pow_step", gamma_up=2.0, gamma_down=0.5)
    omega = 1 - g0
    assert float(single_pulse(ps, g0, True, 16, n=4)[0] - g0) == pytest.approx(0.002 * omega**2)
    assert float(g0 - single_pulse(ps, g0, False, 16, n=4)[0]) == pytest.approx(0.002 * (1 - omega) ** 0.5)


def test_asymmetry_and_up_down_spread():
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=100.0, dw_min_uS=0.1, up_down_asym=0.4, up_down_dtod=0.05, response="linear_step",
                         gamma_up=0.0, gamma_down=0.0)
    st = state_of(dev)
    assert close(float(st.ud_p.std()), 0.05, 0.02)
    st = st._replace(gp=torch.full((N,), 50.0, dtype=F64), gm=torch.full((N,), 50.0, dtype=F64))
    new, _ = dev.apply_pulses(st, torch.ones(N, dtype=F64), torch.zeros(N, dtype=F64), gen(17))
    up = new.gp - 50.0
    assert close(float(up.mean()), 0.1 * 1.2, 0.01) and close(float(up.std()), 0.1 * 0.05, TOL)
    assert close(float((50.0 - new.gm).mean()), 0.1 * 0.8, 0.01)  # G⁻ took a down pulse


# ----------------------------------------------------------------------------- n pulses
@pytest.mark.parametrize("n", [10, 50])
def test_n_soft_bounds_pulses_follow_the_product_of_n_factors(n):
    """Distance to the soft bound d → d(1 − a(1 + σξ)) per pulse: E[d_n] = d₀(1 − a)ⁿ and
    E[d_n²] = d₀²((1 − a)² + a²σ²)ⁿ (aihwkit's per-pulse rule, compounded exactly)."""
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=10.0, dw_min_uS=0.2, response="soft_bounds", c2c_model="multiplicative",
                         dw_ctoc=0.5, update_mode="bidirectional")
    st = state_of(dev)._replace(gp=torch.full((N,), 5.0, dtype=F64), gm=torch.full((N,), 5.0, dtype=F64))
    new, counts = dev.apply_pulses(st, torch.full((N,), float(n), dtype=F64), torch.zeros(N, dtype=F64), gen(18))
    a, s, d0 = 0.2 / 5.0, 0.5, 5.0
    d = 10.0 - new.gp
    m = d0 * (1 - a) ** n
    v = d0**2 * ((1 - a) ** 2 + (a * s) ** 2) ** n - m * m
    assert close(float(d.mean()), m, TOL / 5) and close(float(d.std()), math.sqrt(v), TOL)
    assert int(counts.pulses_up) == int(counts.pulses_down) == N * n  # G⁺ up and G⁻ down per weight pulse


@pytest.mark.parametrize("card", ["reram_agsi", "ecram", "pcm", "reram_agsi_measured"])
def test_n_pulses_at_once_equal_n_single_pulses_in_distribution(card):
    from mep_hw.hw import load_card

    dev = load_card(card).device
    n, cells = 12, 20_000
    st0 = dev.program(state_of(dev, (cells,), seed=20), torch.full((cells,), 0.1, dtype=F64), gen(21))
    at_once, _ = dev.apply_pulses(st0, torch.full((cells,), float(n), dtype=F64), torch.zeros(cells, dtype=F64), gen(22))
    one_by_one = st0
    for k in range(n):
        one_by_one, _ = dev.apply_pulses(one_by_one, torch.ones(cells, dtype=F64), torch.zeros(cells, dtype=F64), gen(100 + k))
    a, b = dev.mean(at_once) - dev.mean(st0), dev.mean(one_by_one) - dev.mean(st0)
    se = float(b.std()) / math.sqrt(cells)
    assert abs(float(a.mean() - b.mean())) < 5 * se + 1e-9
    assert close(float(a.std()), float(b.std()), TOL)
    # and a mixed call interleaves: 3 up and 2 down equal up, down, up, down, up
    mixed, _ = dev.apply_pulses(st0, torch.full((cells,), 3.0, dtype=F64), torch.full((cells,), 2.0, dtype=F64), gen(23))
    seq = st0
    for k, up in enumerate((1, 0, 1, 0, 1)):
        ones, zeros = torch.ones(cells, dtype=F64), torch.zeros(cells, dtype=F64)
        seq, _ = dev.apply_pulses(seq, ones if up else zeros, zeros if up else ones, gen(200 + k))
    a, b = dev.mean(mixed) - dev.mean(st0), dev.mean(seq) - dev.mean(st0)
    assert abs(float(a.mean() - b.mean())) < 5 * float(b.std()) / math.sqrt(cells) + 1e-9


SEQUENCES = ((1, 0), (0, 1), (7, 0), (0, 25), (4, 4), (12, 5), (3, 40))  # (weight-up, weight-down) pulses


def _moment_devices():
    import dataclasses

    from mep_hw.hw import load_card

    return {
        "ecram": load_card("ecram").device,  # linear step, multiplicative noise, bidirectional
        # soft bounds, multiplicative σ = 1, unidirectional (refresh off: it re-programs on the tails)
        "pcm": dataclasses.replace(load_card("pcm").device, refresh_upper=1.0),
        "soft_bounds_additive": CrossbarDevice(g_min_uS=0.0, g_max_uS=10.0, dw_min_uS=0.2, response="soft_bounds",
                                               c2c_model="additive", dw_ctoc=0.5, dw_dtod=0.2, update_mode="bidirectional"),
        # NeuroSim's exponential curves, range noise: concave LTP / convex LTD (negative label) ...
        "reram_agsi": load_card("reram_agsi").device,
        # ... and a positive LTD label (depression retraces the LTP shape), almost no c2c noise
        "fefet": load_card("fefet").device,
        # the linear curve (A → ∞) with additive noise in pulse positions
        "linear_additive": CrossbarDevice(g_min_uS=1.0, g_max_uS=11.0, response="linear", levels=101, c2c_model="additive",
                                          dw_ctoc=0.4, dw_dtod=0.1, update_mode="bidirectional"),
        # multiplicative noise on an exponential curve
        "exponential_mult": CrossbarDevice(g_min_uS=1.0, g_max_uS=11.0, response="exponential", levels=65, nl_ltp=3.0,
                                           nl_ltd=-2.0, c2c_model="multiplicative", dw_ctoc=0.5, dw_dtod=0.1,
                                           update_mode="bidirectional"),
    }


@pytest.mark.parametrize("name,fracs", [("ecram", (0.1, 0.5, 0.9)), ("pcm", (0.1, 0.5, 0.9)), ("soft_bounds_additive", (0.3, 0.5, 0.7)),
                                        ("reram_agsi", (0.3, 0.5, 0.7)), ("fefet", (0.2, 0.5, 0.8)),
                                        ("linear_additive", (0.3, 0.5, 0.7)), ("exponential_mult", (0.3, 0.5, 0.7))])
def test_k_pulses_by_their_moments_match_the_per_pulse_reference(name, fracs, monkeypatch):
    """``pulse_application = "moments"`` against pulses one at a time, at three operating points
    and seven (up, down) sequences (one pulse, runs of one direction, interleaved): mean within
    5 standard errors (+ 1 % near a bound, where a sequence that reaches it is clipped only at
    its end) and standard deviation within 3 %, for both cells of the pair. Every sequence goes by
    its moments here (``MOMENTS_MIN_PULSES`` = 0) unless it starts or is expected to end within 3
    standard deviations of a bound (ReRAM's range noise, 3.5 % of the range per pulse, takes most
    25-pulse runs there: clipped only at their end, Ag:a-Si's 25 down pulses from 0.3 of the range
    moved the mean 4 % too far); at least a third of all devices went by their moments."""
    import dataclasses

    from mep_hw.hw import crossbar

    monkeypatch.setattr(crossbar, "MOMENTS_MIN_PULSES", 0)
    share = [0, 0]
    orig = crossbar.CrossbarDevice._apply_moments

    def spy(self, g, p, free, up, dn, sel, *rest):
        out = orig(self, g, p, free, up, dn, sel, *rest)
        share[0] += int(out[2].sum())
        share[1] += int(sel.sum())
        return out

    monkeypatch.setattr(crossbar.CrossbarDevice, "_apply_moments", spy)
    dev = _moment_devices()[name]
    mom = dataclasses.replace(dev, pulse_application="moments")
    assert mom.applies_moments and not dev.applies_moments
    n = 50_000
    for frac in fracs:
        st = state_of(dev, (n,), seed=30)
        g = torch.full((n,), dev.g_min_uS + frac * dev.g_range, dtype=F64)
        st = st._replace(gp=torch.minimum(g, st.gmax_p), gm=torch.minimum(g, st.gmax_m))  # inside each device's range
        for k, (u, d) in enumerate(SEQUENCES):
            nu, nd = torch.full((n,), float(u), dtype=F64), torch.full((n,), float(d), dtype=F64)
            ref, c_ref = dev.apply_pulses(st, nu, nd, gen(31 + k))
            got, c_got = mom.apply_pulses(st, nu, nd, gen(61 + k))
            assert int(c_got.pulses_up) == int(c_ref.pulses_up) and int(c_got.pulses_down) == int(c_ref.pulses_down)
            for cell in ("gp", "gm"):
                g0 = getattr(st, cell)
                a, b = getattr(ref, cell) - g0, getattr(got, cell) - g0
                se = float(a.std()) / math.sqrt(n)
                where = f"{name} at {frac} of the range, {u} up / {d} down, {cell}"
                assert abs(float(b.mean() - a.mean())) <= 5 * se + 0.01 * abs(float(a.mean())) + 1e-12, where
                assert close(float(b.std()), float(a.std()), 0.03) or float(a.std()) == float(b.std()) == 0.0, where
    assert share[0] >= share[1] / 3, f"{name}: only {share[0]} of {share[1]} devices went by their moments"


def test_moments_take_long_sequences_and_short_ones_stay_per_pulse(monkeypatch):
    """With the default threshold (16) one call mixes both paths: the moments path gets exactly the
    devices with more than 16 pulses, and both halves keep the per-pulse statistics."""
    import dataclasses

    from mep_hw.hw import crossbar, load_card

    dev = load_card("ecram").device
    mom = dataclasses.replace(dev, pulse_application="moments")
    n = 20_000
    st = dev.program(state_of(dev, (n,), seed=40), torch.zeros(n, dtype=F64), gen(41))
    long_ = torch.arange(n) >= n // 2
    nu = torch.where(long_, 30.0, 3.0).to(F64)  # 3 + 2 = 5 pulses per device, or 30 + 2
    nd = torch.full((n,), 2.0, dtype=F64)
    seen = []
    orig = crossbar.CrossbarDevice._apply_moments

    def spy(self, g, p, free, up, dn, sel, *rest):
        seen.append(sel.clone())
        return orig(self, g, p, free, up, dn, sel, *rest)

    monkeypatch.setattr(crossbar.CrossbarDevice, "_apply_moments", spy)
    ref, _ = dev.apply_pulses(st, nu, nd, gen(42))
    got, _ = mom.apply_pulses(st, nu, nd, gen(43))
    assert crossbar.MOMENTS_MIN_PULSES == 16 and len(seen) == 1
    assert torch.equal(seen[0], torch.cat([long_, long_]))  # G⁺ and G⁻ cells of the long weights only
    for half in (long_, ~long_):
        d_ref, d_got = ref.gp[half] - st.gp[half], got.gp[half] - st.gp[half]
        assert abs(float(d_got.mean() - d_ref.mean())) < 5 * float(d_ref.std()) / math.sqrt(n // 2)
        assert close(float(d_got.std()), float(d_ref.std()), 0.05)


def test_pulse_application_moments_falls_back_for_nonaffine_responses():
    """Responses whose step is not affine in G (a measured table, a linear step with γ > 1) are
    pulsed one at a time whatever the field says; an unknown value is refused."""
    import dataclasses

    from mep_hw.hw import load_card

    assert not dataclasses.replace(load_card("reram_agsi_measured").device, pulse_application="moments").applies_moments
    for card in ("reram_taox", "reram_agsi", "fefet", "ecram", "pcm"):  # affine: exponential, linear step, soft bounds
        assert dataclasses.replace(load_card(card).device, pulse_application="moments").applies_moments
    assert not CrossbarDevice(response="linear_step", gamma_up=1.5, pulse_application="moments").applies_moments
    with pytest.raises(ConfigError, match="pulse_application"):
        CrossbarDevice(pulse_application="closed_form")


# ----------------------------------------------------------------------------- symmetry, dw_pulse
def test_symmetry_point_of_linear_step_pairs_matches_the_closed_form():
    """aihwkit's symmetry point w* = (α₊ − α₋)/(α₊γ₊/U + α₋γ₋/D) per device; alternating pulses
    drive a pair there."""
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=1.0, dw_min_uS=0.004, response="linear_step", gamma_up=0.5, gamma_down=1.0,
                         step_ref_frac=0.5, up_down_asym=0.2, dw_dtod=0.2, up_down_dtod=0.05)
    cells = 2000
    st = dev.program(state_of(dev, (cells,), seed=24), torch.zeros(cells, dtype=F64), gen(25))
    w_star = dev.symmetry_point(st)

    def g_star(dwf, ud, gmax):
        su, sd = dwf * (1 + 0.1 + ud), dwf * (1 - 0.1 - ud)
        ref = 0.5 * gmax
        x = (su - sd) / (su * 0.5 / (gmax - ref) + sd * 1.0 / ref)
        return ref + x

    expected = (torch.minimum(g_star(st.dw_p, st.ud_p, st.gmax_p).clamp(min=0), st.gmax_p)
                - torch.minimum(g_star(st.dw_m, st.ud_m, st.gmax_m).clamp(min=0), st.gmax_m))
    torch.testing.assert_close(w_star, expected, atol=1e-9, rtol=1e-6)
    quiet = CrossbarDevice(**{**{k: getattr(dev, k) for k in ("g_min_uS", "g_max_uS", "dw_min_uS", "response", "gamma_up",
                                                            "gamma_down", "step_ref_frac", "up_down_asym")}})
    for _ in range(40):  # 40 × (50 up, 50 down) pulses: converged to within a step
        st, _ = quiet.apply_pulses(st._replace(), torch.full((cells,), 50.0, dtype=F64), torch.full((cells,), 50.0, dtype=F64), gen(26))
    assert float((quiet.mean(st) - quiet.symmetry_point(st)).abs().max()) < 0.02


def test_only_a_state_dependent_response_pulls_a_pair_to_its_symmetry_point():
    """A symmetric linear response has equal expected up and down steps everywhere: no leak.
    Unequal ones (a linear device whose down step is twice its up step) drive both devices of a
    pair to a bound, and every physical card's response depends on the conductance: a leak.
    Checked against the pulses themselves: alternating up and down pulses leave a symmetric
    linear pair's weight where it was and move the others'."""
    from mep_hw.hw import load_card

    lin = CrossbarDevice(response="linear", levels=100)
    assert not lin.restores_to_symmetry_point
    assert not CrossbarDevice(response="linear", levels=100, update_mode="unidirectional").restores_to_symmetry_point
    assert not CrossbarDevice(response="linear", levels=4).restores_to_symmetry_point  # a step clipped at a bound is no pull
    assert not CrossbarDevice(response="linear", levels=100, levels_down=50, update_mode="unidirectional").restores_to_symmetry_point
    lin_asym = CrossbarDevice(response="linear", levels=100, levels_down=50)  # down step twice the up step
    assert lin_asym.restores_to_symmetry_point
    assert not IdealDevice().restores_to_symmetry_point
    for card in ("pcm", "reram_taox", "reram_agsi", "reram_agsi_measured", "ecram", "fefet"):
        assert load_card(card).device.restores_to_symmetry_point, card
    soft = CrossbarDevice(response="soft_bounds", dw_min_uS=0.25)
    assert soft.restores_to_symmetry_point
    cells = 1000
    for dev, moves in ((lin, False), (lin_asym, True), (soft, True)):
        st = dev.program(state_of(dev, (cells,)), torch.full((cells,), 0.4, dtype=F64), gen(60))
        w0 = dev.mean(st)
        for _ in range(5):
            st, _ = dev.apply_pulses(st, torch.full((cells,), 4.0, dtype=F64), torch.full((cells,), 4.0, dtype=F64), gen(61))
        shift = float((dev.mean(st) - w0).mean())
        assert (abs(shift) > 0.05) == moves, (dev.response, shift)


def test_dw_pulse_is_the_step_at_the_symmetry_point():
    """A bidirectional soft-bounds pair at its symmetry point moves by dw_pulse per pulse: one host
    update achieves what it intends (the issue: half of it)."""
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=10.0, dw_min_uS=0.05, response="soft_bounds")
    assert dev.dw_pulse == pytest.approx(2 * 0.05 / 10.0)
    st = dev.program(state_of(dev, (100,)), torch.zeros(100, dtype=F64), gen(27))
    new, _ = dev.update(st, torch.full((100,), dev.dw_pulse, dtype=F64), gen(28))
    torch.testing.assert_close(dev.mean(new) - dev.mean(st), torch.full((100,), dev.dw_pulse, dtype=F64))
    pcm = CrossbarDevice(g_min_uS=0.0, g_max_uS=25.0, dw_min_uS=0.5, response="soft_bounds", step_ref_frac=0.0,
                         update_mode="unidirectional")
    assert pcm.dw_pulse == pytest.approx(0.5 / 25.0)
    assert float(pcm.symmetry_point(pcm.program(state_of(pcm, (5,)), torch.zeros(5, dtype=F64), gen(0))).abs().max()) < 1e-9


def bidirectional_cards():
    from mep_hw.hw import list_cards

    return [c.name for c in list_cards() if isinstance(c.device, CrossbarDevice) and c.device.update_mode == "bidirectional"]


@pytest.mark.parametrize("card", bidirectional_cards())
def test_one_pulse_at_zero_weight_achieves_dw_pulse_on_every_bidirectional_card(card):
    """w̃ = 0 is programmed at the nominal symmetry point G* (aihwkit: w = 0 is the symmetry point),
    where dw_pulse is evaluated, so one intended step at w̃ = 0 achieves itself on average (mean
    over 10⁵ weights with the card's programming noise and device-to-device spread; the zero-mean
    cycle-to-cycle noise off). Mid-range centring gave 1.56 / 1.14 / 1.04 × on reram_agsi_measured
    / reram_agsi / ecram."""
    import dataclasses

    from mep_hw.hw import load_card

    dev = dataclasses.replace(load_card(card).device, dw_ctoc=0.0)
    n = 100_000
    one = torch.ones(1, dtype=F64)
    q = dev._prep(_Dev(one * dev.g_max_uS, one, one * 0.0, torch.zeros(1, dtype=torch.int64)))
    c = one * dev.g_center
    up, down = dev._next(c, q, True) - c, c - dev._next(c, q, False)
    assert float(up) == pytest.approx(float(down), rel=1e-6)  # the centre is the nominal device's G*
    assert dev.dw_pulse == pytest.approx(float(up + down) / dev.g_range, rel=1e-9)
    st = dev.program(state_of(dev, (n,), seed=41), torch.zeros(n, dtype=F64), gen(42))
    w0 = dev.mean(st)
    for sign in (1.0, -1.0):
        new, _ = dev.update(st, torch.full((n,), sign * dev.dw_pulse, dtype=F64), gen(43))
        ratio = float(((dev.mean(new) - w0) / (sign * dev.dw_pulse)).mean())
        assert abs(ratio - 1.0) < 0.03, (card, sign, ratio)


@pytest.mark.parametrize("frac", [0.05, 0.2357, 0.5, 0.9])
def test_bidirectional_mapping_centres_on_the_symmetry_point_and_keeps_the_full_range(frac):
    """G± = c ± w̃⁺(g_max − c) ∓ w̃⁻(c − g_min) (w̃⁺ = max(w̃, 0), w̃⁻ = max(−w̃, 0)): both devices at
    c for w̃ = 0, (g_max, g_min) at w̃ = 1, (g_min, g_max) at w̃ = −1, and (G⁺ − G⁻)/R = w̃ throughout."""
    dev = CrossbarDevice(g_min_uS=1.0, g_max_uS=11.0, dw_min_uS=0.01, response="linear_step", gamma_up=0.3, gamma_down=0.3,
                         step_ref_frac=frac, update_mode="bidirectional")
    c = dev.g_center
    assert c == pytest.approx(1.0 + 10.0 * frac, abs=1e-9)  # linear_step: G* = G_ref without asymmetry
    w = torch.linspace(-1.0, 1.0, 2001, dtype=F64)
    gp, gm = dev.to_physical(w)
    torch.testing.assert_close(dev.to_logical(gp, gm), w, atol=1e-12, rtol=0)
    assert float(gp.min()) >= 1.0 - 1e-12 and float(gm.max()) <= 11.0 + 1e-12
    ends = dev.to_physical(torch.tensor([-1.0, 0.0, 1.0], dtype=F64))
    torch.testing.assert_close(ends[0], torch.tensor([1.0, c, 11.0], dtype=F64))
    torch.testing.assert_close(ends[1], torch.tensor([11.0, c, 1.0], dtype=F64))


def test_ecram_symmetry_point_spread_matches_the_closed_form():
    """aihwkit LinearStep with mean_bound_reference = True (its default): the slopes divide by the
    *mean* bounds, w = 0 is the same for every device, so only the up/down bias r spreads the
    symmetry points: x* = (s↑ − s↓)/(s↑γ↑/U + s↓γ↓/D), s↑,↓ = 1 ± r, U = g_max − G_ref,
    D = G_ref − g_min of the card's nominal range; w̃* = (x*⁺ − x*⁻)/R, std ≈ √2·2σ_r/(γ↑R/U + γ↓R/D)
    = 0.0198 (per-device bounds and G_ref gave 0.035). The device's own g_max only clips."""
    from mep_hw.hw import load_card

    dev = load_card("ecram").device
    assert dev.g_dtod > 0 and dev.up_down_dtod > 0  # the card's device-to-device spread is on
    st = dev.program(state_of(dev, seed=44), torch.zeros(N, dtype=F64), gen(45))
    R, ref = dev.g_range, dev.g_min_uS + dev.step_ref_frac * dev.g_range
    U, D = dev.g_max_uS - ref, ref - dev.g_min_uS

    def x_star(r, gmax):
        su, sd = 1.0 + r, 1.0 - r
        x = (su - sd) / (su * dev.gamma_up / U + sd * dev.gamma_down / D)
        return torch.minimum(ref + x, gmax) - ref

    expected = (x_star(st.ud_p, st.gmax_p) - x_star(st.ud_m, st.gmax_m)) / R
    w_star = dev.symmetry_point(st)
    torch.testing.assert_close(w_star, expected, atol=1e-9, rtol=1e-6)
    linear = math.sqrt(2) * 2 * dev.up_down_dtod / (dev.gamma_up * R / U + dev.gamma_down * R / D)
    assert linear == pytest.approx(0.0198, abs=5e-4)
    assert close(float(w_star.std()), linear, TOL) and abs(float(w_star.mean())) < 5 * linear / math.sqrt(N)


def test_symmetry_of_unidirectional_pairs_keeps_the_lower_device():
    pcm = CrossbarDevice(g_min_uS=0.0, g_max_uS=25.0, dw_min_uS=0.5, response="soft_bounds", step_ref_frac=0.0,
                         update_mode="unidirectional")
    st = state_of(pcm, (3,))._replace(gp=torch.tensor([5.0, 10.0, 2.0], dtype=F64), gm=torch.tensor([5.0, 2.0, 10.0], dtype=F64))
    # identical devices: the SET steps are equal where G⁺ = G⁻
    torch.testing.assert_close(pcm.symmetry_point(st), torch.zeros(3, dtype=F64), atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------- bounds, stuck, refresh
def test_linear_pulses_move_by_whole_steps_and_saturate():
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=10.0, levels=11, response="linear")  # 1 µS per device pulse
    assert dev.dw_pulse == pytest.approx(0.2)  # G⁺ up and G⁻ down by 1 µS each
    st = dev.program(state_of(dev, (3,)), torch.zeros(3, dtype=F64), gen(12))
    st, c = dev.update(st, torch.tensor([0.4, -0.2, 0.0], dtype=F64), gen(13))  # 2, 1, 0 weight pulses
    assert int(c.pulses_up) == int(c.pulses_down) == 3
    torch.testing.assert_close(dev.mean(st), torch.tensor([0.4, -0.2, 0.0], dtype=F64))
    st, _ = dev.update(st, torch.tensor([5.0, -5.0, 0.0], dtype=F64), gen(14))  # far past the bounds
    torch.testing.assert_close(dev.mean(st), torch.tensor([1.0, -1.0, 0.0], dtype=F64))


def test_device_to_device_and_stuck_cells():
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=10.0, g_dtod=0.1, dw_dtod=0.2, stuck_on_rate=0.01, stuck_off_rate=0.02)
    st = state_of(dev)
    assert close(float(st.gmax_p.std()), 1.0, 0.02) and close(float(st.dw_p.std()), 0.2, 0.02)
    on, off = (st.stuck_p == 1).double().mean(), (st.stuck_p == -1).double().mean()
    assert abs(float(on) - 0.01) < 5 * math.sqrt(0.01 / N) and abs(float(off) - 0.02) < 5 * math.sqrt(0.02 / N)
    st = dev.program(st, torch.full((N,), 0.3, dtype=F64), gen(10))
    stuck = st.stuck_p != 0
    pinned = st.gp[stuck].clone()
    assert torch.all((pinned == st.gmax_p[stuck]) | (pinned == 0.0))
    for dw in (0.2, -0.5, 0.9):
        st, _ = dev.update(st, torch.full((N,), dw, dtype=F64), gen(11))
        assert torch.equal(st.gp[stuck], pinned)
    assert not torch.equal(st.gp[~stuck][:100], torch.full((100,), 6.5, dtype=F64))


def test_unidirectional_pairs_refresh_by_aihwkits_criterion():
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=10.0, levels=11, response="linear", update_mode="unidirectional")
    st = dev.program(state_of(dev, (2,)), torch.tensor([0.5, -0.5], dtype=F64), gen(19))
    w_before = dev.mean(st)
    total_refresh = 0
    for _ in range(8):  # +0.1 then −0.1: each direction potentiates a device, both climb
        st, c1 = dev.update(st, torch.tensor([0.1, 0.1], dtype=F64), gen(20))
        st, c2 = dev.update(st, torch.tensor([-0.1, -0.1], dtype=F64), gen(21))
        total_refresh += int(c1.refreshes) + int(c2.refreshes)
        assert int(c1.pulses_down) == 0 and int(c2.pulses_down) == 0  # SET pulses only
        lo = torch.minimum(st.gp, st.gm) / 10.0
        hi = torch.maximum(st.gp, st.gm) / 10.0
        assert not bool(((hi > 0.75) & (lo > 0.25)).any())  # no pair left past both thresholds
    assert total_refresh > 0
    torch.testing.assert_close(dev.mean(st), w_before)  # refreshes keep the weight


def test_pulses_redraw_drift_and_refresh_reprogram_only_the_cells_they_write():
    """A pulse redraws ν (at the conductance it left) only on the devices it moved; a refresh
    re-programs only the pairs past aihwkit's thresholds. The rest keep their state bit for bit,
    and the redrawn ν follow |N(μ(g), σ(g))|."""
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=25.0, levels=0, response="linear", dw_min_uS=0.25,
                         update_mode="unidirectional", drift_model="pcm", prog_noise_model="pcm", prog_noise=1.0)
    w = torch.full((N,), 0.1, dtype=F64)
    w[: N // 2] = 0.8  # the first half will be refreshed once SET pulses lift its G⁻ past 0.25
    st = dev.program(state_of(dev), w, gen(50))
    n_up = torch.zeros(N, dtype=F64)
    n_dn = torch.zeros(N, dtype=F64)
    moved = torch.zeros(N, dtype=torch.bool)
    moved[: 3 * N // 4] = True
    n_dn[moved] = 30.0  # 30 SET pulses on G⁻: +0.3 of the range
    new, counts = dev.apply_pulses(st, n_up, n_dn, gen(51))
    rest = ~moved
    for k in ("gp", "gm", "nu_p", "nu_m", "tprog_p", "tprog_m"):
        assert torch.equal(getattr(new, k)[rest], getattr(st, k)[rest]), k
    refreshed = int(counts.refreshes)
    assert 0.8 * (N // 2) < refreshed <= N // 2  # G⁺ ≈ 0.8 R (± programming noise), G⁻ lifted to ≈ 0.3 R
    assert torch.equal(new.nu_p[N // 2: 3 * N // 4], st.nu_p[N // 2: 3 * N // 4])  # G⁺ of unrefreshed pairs kept
    nu = new.nu_m[N // 2: 3 * N // 4]  # pulsed, not refreshed: ν drawn at the G⁻ the pulses left
    g_rel = float(new.gm[N // 2: 3 * N // 4].mean()) / 25.0
    mu, sd = (float(x) for x in pcm_drift_nu(torch.tensor([g_rel], dtype=F64)))
    m, s, _ = folded_normal_moments(mu, sd)
    assert close(float(nu.mean()), m, TOL) and close(float(nu.std()), s, 2 * TOL)


def test_apply_pulses_rejects_bad_counts():
    dev = CrossbarDevice()
    st = state_of(dev, (2, 3))
    with pytest.raises(DeviceError, match="non-negative"):
        dev.apply_pulses(st, torch.full((2, 3), -1.0), torch.zeros(2, 3), gen(0))
    with pytest.raises(DeviceError, match="weight shape"):
        dev.apply_pulses(st, torch.ones(3, 2), torch.zeros(3, 2), gen(0))
    with pytest.raises(DeviceError, match="no pulse model"):
        FixedPointDevice().apply_pulses(None, torch.ones(1), torch.ones(1), gen(0))


def test_write_energy_is_v2_g_t_per_pulse():
    """NeuroSim writeEnergy: V²·(G_before + G_after)/2·t per pulse (resistive), + V²·C (gate)."""
    dev = CrossbarDevice(g_min_uS=1.0, g_max_uS=11.0, levels=11, response="linear", v_write_up_V=2.0, v_write_down_V=1.5,
                         t_write_up_s=1e-6, t_write_down_s=2e-6, c_write_F=1e-15)
    st = state_of(dev, (1,))._replace(gp=torch.tensor([3.0], dtype=F64), gm=torch.tensor([8.0], dtype=F64))
    _, c = dev.apply_pulses(st, torch.tensor([2.0], dtype=F64), torch.zeros(1, dtype=F64), gen(0))
    # G⁺: 3 → 4 → 5 (up), G⁻: 8 → 7 → 6 (down)
    up = 4.0 * 1e-6 * 1e-6 * (3.5 + 4.5) + 2 * 4.0 * 1e-15
    down = 2.25 * 2e-6 * 1e-6 * (7.5 + 6.5) + 2 * 2.25 * 1e-15
    assert float(c.write_J) == pytest.approx(up + down, rel=1e-9)


# ----------------------------------------------------------------------------- NeuroSim table, measured curves
def test_neurosim_nonlinearity_labels_match_its_table():
    # NeuroSim (MLP+NeuroSim V3.0 formula.cpp, getParamA): A/P_max for labels 0.01, 0.1, 0.4, 0.6, 2.4, 4.88, 9
    for label, a in ((0.01, 126.268958), (0.1, 12.625807), (0.4, 3.152324), (0.6, 2.097877), (2.4, 0.499181),
                     (4.88, 0.200303), (9.0, 0.022810)):
        assert abs(neurosim_a(label) / a - 1) < 1e-3, label
    assert math.isinf(neurosim_a(0.0))


def test_monotone_curve_pools_violators():
    # PAV on (0,0) (1,2) (2,1) (3,3): blocks {0}, {1,2} → 1.5 at x = 1.5, {3}
    c = monotone_curve([0, 1, 2, 3], [0.0, 2.0, 1.0, 3.0])
    assert c == pytest.approx((0.0, 1.5 * (1 / 1.5), 1.5 + 0.5 * (1.5 / 1.5), 3.0))
    assert all(b > a for a, b in zip(c, c[1:]))
    d = monotone_curve([0, 1, 2], [3.0, 1.0, 2.0], increasing=False)
    assert all(b < a for a, b in zip(d, d[1:]))
    with pytest.raises(ConfigError, match="not monotone"):
        monotone_curve([0, 1], [1.0, 0.5])


# ----------------------------------------------------------------------------- ideal limit
def test_a_noiseless_continuous_crossbar_equals_the_ideal_device():
    W = torch.randn(7, 12, generator=gen(22), dtype=F64) * 0.2
    for mode in ("bidirectional", "unidirectional"):
        ideal = Tile(IdealDevice(), Periphery(), W, seed=0)
        xbar = Tile(CrossbarDevice(update_mode=mode), Periphery(), W, seed=0)
        torch.testing.assert_close(xbar.held(), ideal.held())
        x = torch.rand(5, 12, generator=gen(23), dtype=F64)
        torch.testing.assert_close(xbar.mvm(x), ideal.mvm(x))
        torch.testing.assert_close(xbar.mvm_t(x[:, :7]), ideal.mvm_t(x[:, :7]))
        dW = torch.randn(7, 12, generator=gen(24), dtype=F64) * 0.01
        a, b = xbar.write(dW), ideal.write(dW)
        # a continuous device still takes whole pulses: the change matches to half a pulse
        assert float((a - b).abs().max()) <= 0.5 * xbar.w_scale * xbar.device.dw_pulse + 1e-12


# ----------------------------------------------------------------------------- periphery, validation
def test_quantizer():
    x = torch.linspace(-2, 2, 41, dtype=F64)
    q = quantize(x, 4, 1.0)  # 15 levels, step 2/14
    step = 2 / 14
    assert torch.allclose(q / step, (q / step).round(), atol=1e-12)
    assert float(q.max()) == pytest.approx(1.0) and float(q.min()) == pytest.approx(-1.0)
    assert float((q - x.clamp(-1, 1)).abs().max()) <= step / 2 + 1e-12
    assert quantize(x, 0, 1.0) is x
    assert Periphery(dac_bits=8, dac_bound=1.0).dac_step == pytest.approx(2 / 254)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"g_max_uS": -1.0}, "g_max_uS=-1.0 is out of range"),
        ({"levels": 1}, "levels=1 is out of range"),
        ({"read_noise": -0.1}, r"read_noise=-0.1 is out of range: expected a number in \[0.0, 10.0\]"),
        ({"response": "cubic"}, "response='cubic' is not valid"),
        ({"c2c_model": "lognormal"}, "c2c_model='lognormal' is not valid; choose one of: multiplicative"),
        ({"stuck_on_rate": 0.7, "stuck_off_rate": 0.5}, "must not exceed 1"),
        ({"response": "table"}, "response='table' needs a measured table"),
        ({"step_ref_frac": 0.0}, r"step_ref_frac=0.0 is out of range"),
        ({"input_coding": "binary"}, "input_coding='binary' is not valid"),
    ],
)
def test_bad_device_fields_name_the_field_and_range(kw, match):
    with pytest.raises(ConfigError, match=match):
        CrossbarDevice(**kw)
    with pytest.raises(ConfigError, match="dac_bits=1 must be 0"):
        Periphery(dac_bits=1)

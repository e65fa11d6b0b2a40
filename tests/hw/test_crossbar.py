"""Crossbar physics: every noise model against its formula, pulses, bounds, stuck cells."""

import math

import pytest
import torch

from mep_hw.errors import ConfigError
from mep_hw.hw import CrossbarDevice, IdealDevice, NoiseBank, Periphery, Tile, neurosim_a, quantize

F64 = torch.float64
N = 200_000  # samples for the statistics tests


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def state_of(dev, shape=(N,), seed=0, dtype=F64):
    return dev.init_state(shape, gen(seed), dtype, "cpu")


def close(x, y, rel):
    return abs(x - y) <= rel * abs(y)


# ----------------------------------------------------------------------------- programming
@pytest.mark.slow
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


@pytest.mark.slow
def test_relative_programming_noise_and_levels():
    dev = CrossbarDevice(g_min_uS=1.0, g_max_uS=11.0, prog_noise_model="relative", prog_noise=0.02)
    st = dev.program(state_of(dev), torch.full((N,), 0.3, dtype=F64), gen(3))
    assert close(float(st.gp.std()), 0.02 * 10.0, 0.01)
    q = CrossbarDevice(g_min_uS=1.0, g_max_uS=11.0, levels=6)  # levels every 2 µS
    st = q.program(state_of(q, (1000,)), torch.linspace(-1, 1, 1000, dtype=F64), gen(4))
    k = (st.gp - 1.0) / 2.0
    assert torch.allclose(k, k.round(), atol=1e-12) and set(torch.unique(st.gp).tolist()) <= {1.0, 3.0, 5.0, 7.0, 9.0, 11.0}


@pytest.mark.slow
def test_read_noise_is_resampled_and_has_its_std():
    dev = CrossbarDevice(read_noise=0.01)
    st = dev.program(state_of(dev, (8,)), torch.full((8,), 0.25, dtype=F64), gen(5))
    bank = NoiseBank(7, size=1 << 20, dtype=F64)
    reads = torch.stack([dev.read(st, bank) for _ in range(N // 8)])  # (reads, cells)
    assert close(float(reads.std()), math.sqrt(2) * 0.01, 0.01)  # two devices per weight
    assert abs(float(reads.mean()) - 0.25) < 4 * 0.0142 / math.sqrt(reads.numel())
    # independent reads: the correlation of a cell's noise between consecutive reads is ~0
    r = reads - reads.mean(0)
    corr = float((r[1:] * r[:-1]).mean() / r.var())
    assert abs(corr) < 0.01


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


def test_drift_power_law():
    dev = CrossbarDevice(drift_nu_mean=0.05, drift_nu_std=0.0, drift_t0_s=20.0, update_mode="unidirectional")
    st = dev.program(state_of(dev, (10,)), torch.full((10,), 0.8, dtype=F64), gen(9))
    g0 = st.gp.clone()
    for t in (0.0, 20.0, 3600.0, 86400.0):
        later = dev.advance(st, t)
        g = dev.physical(later)["g_plus"][0]
        torch.testing.assert_close(g, g0 * ((t + 20.0) / 20.0) ** -0.05)
    spread = CrossbarDevice(drift_nu_mean=0.05, drift_nu_std=0.01)
    st = state_of(spread)
    assert close(float(st.nu_p.mean()), 0.05, 0.01) and close(float(st.nu_p.std()), 0.01, 0.02)


@pytest.mark.slow
def test_device_to_device_and_stuck_cells():
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=10.0, g_dtod=0.1, dw_dtod=0.2, stuck_on_rate=0.01, stuck_off_rate=0.02)
    st = state_of(dev)
    assert close(float(st.gmax_p.std()), 1.0, 0.02) and close(float(st.dw_p.std()), 0.2, 0.02)
    on, off = (st.stuck_p == 1).double().mean(), (st.stuck_p == -1).double().mean()
    assert abs(float(on) - 0.01) < 5 * math.sqrt(0.01 / N) and abs(float(off) - 0.02) < 5 * math.sqrt(0.02 / N)
    # stuck devices never move, whatever is programmed or pulsed
    st = dev.program(st, torch.full((N,), 0.3, dtype=F64), gen(10))
    stuck = st.stuck_p != 0
    pinned = st.gp[stuck].clone()
    assert torch.all((pinned == st.gmax_p[stuck]) | (pinned == 0.0))
    for dw in (0.2, -0.5, 0.9):
        st, _ = dev.update(st, torch.full((N,), dw, dtype=F64), gen(11))
        assert torch.equal(st.gp[stuck], pinned)
    assert not torch.equal(st.gp[~stuck][:100], torch.full((100,), 6.5, dtype=F64))


# ----------------------------------------------------------------------------- pulses
def test_linear_pulses_move_by_whole_steps_and_saturate():
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=10.0, levels=11, response="linear")  # 1 µS per pulse
    st = dev.program(state_of(dev, (3,)), torch.zeros(3, dtype=F64), gen(12))  # G+ = G- = 5 µS
    st, c = dev.update(st, torch.tensor([0.3, -0.2, 0.0], dtype=F64), gen(13))  # 3, 2, 0 pulses
    assert c.pulses_up + c.pulses_down == 5
    torch.testing.assert_close(dev.mean(st), torch.tensor([0.3, -0.2, 0.0], dtype=F64))
    st, _ = dev.update(st, torch.tensor([5.0, -5.0, 0.0], dtype=F64), gen(14))  # far past the bounds
    torch.testing.assert_close(dev.mean(st), torch.tensor([1.0, -1.0, 0.0], dtype=F64))


@pytest.mark.slow
def test_a_device_that_takes_no_pulse_keeps_its_programmed_conductance():
    # programming noise leaves G off the level grid; an update too small for a pulse must not
    # snap it back onto the grid (that would silently remove the programming noise)
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=25.0, levels=16, prog_noise_model="pcm", prog_noise=1.0)
    st = dev.program(state_of(dev), torch.full((N,), 0.4, dtype=F64), gen(30))
    assert float((st.gp - dev._quantise(st.gp.clone())).abs().max()) > 0.1  # off the grid
    new, c = dev.update(st, torch.full((N,), 1e-3, dtype=F64), gen(31))  # < half a level: 0 pulses
    assert c.pulses_up == c.pulses_down == 0
    assert torch.equal(new.gp, st.gp) and torch.equal(new.gm, st.gm)


@pytest.mark.parametrize("response", ["soft_bounds", "exponential"])
def test_closed_form_of_n_pulses_equals_n_single_pulses(response):
    dev = CrossbarDevice(g_min_uS=1.0, g_max_uS=11.0, dw_min_uS=0.1, response=response, nl_ltp=2.4, nl_ltd=-4.88)
    g = torch.full((4,), 3.0, dtype=F64)
    ones = torch.ones(4, dtype=torch.int64)
    for up in (True, False):
        n = torch.tensor([1.0, 5.0, 17.0, 40.0], dtype=F64)
        many = dev._pulse(g, n, up, torch.full((4,), 11.0, dtype=F64), torch.ones(4, dtype=F64), gen(15))
        single = g.clone()
        for k in range(40):
            step = dev._pulse(single, (k < n).to(F64) * ones, up, torch.full((4,), 11.0, dtype=F64), torch.ones(4, dtype=F64), gen(15))
            single = step
        torch.testing.assert_close(many, single)


def test_exponential_response_spans_the_range_in_p_max_pulses():
    dev = CrossbarDevice(g_min_uS=1.0, g_max_uS=11.0, levels=0, dw_min_uS=0.1, response="exponential", nl_ltp=2.4, nl_ltd=-4.88)
    p_max = torch.tensor([100.0], dtype=F64)  # (11 − 1)/0.1
    one, gmax = torch.ones(1, dtype=F64), torch.full((1,), 11.0, dtype=F64)
    top = dev._pulse(torch.tensor([1.0], dtype=F64), p_max, True, gmax, one, gen(16))
    bottom = dev._pulse(torch.tensor([11.0], dtype=F64), p_max, False, gmax, one, gen(16))
    torch.testing.assert_close(top, gmax)
    torch.testing.assert_close(bottom, torch.tensor([1.0], dtype=F64))
    half = dev._pulse(torch.tensor([1.0], dtype=F64), p_max / 2, True, gmax, one, gen(16))
    assert float(half) > 6.0  # a positive label: potentiation fast first


def test_asymmetry_and_cycle_to_cycle_noise():
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=100.0, dw_min_uS=0.1, up_down_asym=0.4, dw_ctoc=0.3)
    g = torch.full((N,), 50.0, dtype=F64)
    n = torch.full((N,), 9.0, dtype=F64)
    one, gmax = torch.ones(N, dtype=F64), torch.full((N,), 100.0, dtype=F64)
    up = dev._pulse(g, n, True, gmax, one, gen(17)) - 50.0
    down = 50.0 - dev._pulse(g, n, False, gmax, one, gen(18))
    assert close(float(up.mean()), 9 * 0.1 * 1.2, 0.01) and close(float(down.mean()), 9 * 0.1 * 0.8, 0.01)
    assert close(float(up.std()), 0.3 * 0.1 * 3.0, 0.02)  # σ · Δg · √n


def test_unidirectional_devices_refresh_when_saturated():
    dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=10.0, levels=11, update_mode="unidirectional")
    st = dev.program(state_of(dev, (2,)), torch.tensor([0.5, -0.5], dtype=F64), gen(19))
    w_before = dev.mean(st)
    total_refresh = 0
    for _ in range(6):  # +0.1 then −0.1: each direction potentiates a device until it saturates
        st, c1 = dev.update(st, torch.tensor([0.1, 0.1], dtype=F64), gen(20))
        st, c2 = dev.update(st, torch.tensor([-0.1, -0.1], dtype=F64), gen(21))
        total_refresh += c1.refreshes + c2.refreshes
        assert c1.pulses_down == 0 and c2.pulses_down == 0  # SET pulses only
    assert total_refresh > 0
    torch.testing.assert_close(dev.mean(st), w_before)  # refreshes keep the weight


def test_neurosim_nonlinearity_labels_match_their_table():
    # NeuroSim (MLP_NeuroSim formula.cpp, getParamA): A/P_max for labels 0.01, 0.1, 0.4, 0.6
    for label, a in ((0.01, 126.268958), (0.1, 12.625807), (0.4, 3.152324), (0.6, 2.097877)):
        assert abs(neurosim_a(label) / a - 1) < 0.015
    assert math.isinf(neurosim_a(0.0))


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
        # a continuous device still takes whole pulses (range/1000 here): the change matches to a pulse
        assert float((a - b).abs().max()) <= 0.5 * xbar.w_scale * (2.0 / 1000) + 1e-12


# ----------------------------------------------------------------------------- periphery
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
        ({"stuck_on_rate": 0.7, "stuck_off_rate": 0.5}, "must not exceed 1"),
    ],
)
def test_bad_device_fields_name_the_field_and_range(kw, match):
    with pytest.raises(ConfigError, match=match):
        CrossbarDevice(**kw)
    with pytest.raises(ConfigError, match="dac_bits=1 must be 0"):
        Periphery(dac_bits=1)

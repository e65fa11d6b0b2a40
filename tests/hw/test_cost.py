"""Cost accounting: operation counts checked by hand, energy and latency formulas, missing constants."""

import math

import pytest
import torch

from mep_hw.errors import ConfigError
from mep_hw.host.flops import dion_flops, ep_estimate_flops, host_step_flops, muon_flops, newton_schulz_flops
from mep_hw.hw import Tile, load_card
from mep_hw.hw.cost import CostConstants, CostCounts, cost_summary
from mep_hw.train import TrainConfig, train
from tests.train.runs import metrics


def test_a_tile_counts_macs_and_conversions_of_each_read():
    card = load_card("pcm")
    t = Tile(card.device, card.periphery, torch.randn(3, 5) * 0.1, seed=0)  # out 3, in 5
    t.mvm(torch.rand(4, 5))  # 4 inputs of 5: 4·3·5 MACs, 4·5 DAC, 4·3 ADC
    assert t.op_counts()[:3] == (60, 20, 12)
    t.mvm_t(torch.rand(2, 3))  # transpose: 2·3·5 MACs, 2·3 DAC, 2·5 ADC
    assert t.op_counts()[:3] == (90, 26, 22)
    fp = load_card("fpga_q16")  # a digital datapath has no converters
    d = Tile(fp.device, fp.periphery, torch.randn(3, 5) * 0.1, seed=0)
    d.mvm(torch.rand(4, 5))
    assert d.op_counts()[:3] == (60, 0, 0)


def test_energy_and_latency_follow_the_formulas():
    const = CostConstants(tau_s=1e-7, e_mac_J=1e-13, e_dac_J=2e-13, e_adc_J=1e-12, e_pulse_J=1e-11, e_refresh_J=1e-10,
                          host_e_flop_J=1e-11, e_neuron_op_J=3e-14)
    c = CostCounts(samples=10, macs=1000, dac=100, adc=50, pulses=20, refreshes=2, host_flops=500,
                   settle_time_tau=60.0, settle_steps=60.0, phases=3, neuron_ops=2000)
    s = cost_summary(const, c, kind="crossbar")
    e = s["energy_J_per_sample"]
    assert e["array"] == pytest.approx(100 * 1e-13) and e["dac"] == pytest.approx(10 * 2e-13)
    assert e["adc"] == pytest.approx(5 * 1e-12) and e["programming"] == pytest.approx(2 * 1e-11 + 0.2 * 1e-10)
    assert e["host"] == pytest.approx(50 * 1e-11) and e["neurons"] == pytest.approx(200 * 3e-14)
    assert e["total"] == pytest.approx(1e-11 + 2e-12 + 5e-12 + 4e-11 + 5e-10 + 6e-12)
    # the default neuron-op energy: Horowitz (ISSCC 2014), an 8-bit multiply in 45 nm
    assert cost_summary(CostConstants(), c._replace(host_flops=0), kind="crossbar")["per_sample"]["neuron_ops"] == 200
    assert CostConstants().e_neuron_op_J == pytest.approx(0.2e-12)
    assert s["latency_s_per_sample"] == pytest.approx(6.0 * 1e-7) and s["latency_s_per_phase"] == pytest.approx(2e-7)
    # a clocked datapath: steps × ⌈MACs per evaluation / MACs per cycle⌉ / clock
    fp = cost_summary(CostConstants(e_mac_J=1e-12, macs_per_cycle=1024), c._replace(dac=0, adc=0, pulses=0, refreshes=0),
                      kind="fixed_point", clock_hz=2e8, macs_per_eval=5000, init_macs=3000)
    assert fp["latency_s_per_sample"] == pytest.approx((6.0 * math.ceil(5000 / 1024) + math.ceil(3000 / 1024)) / 2e8)
    assert cost_summary(const, c, kind="crossbar", init_reads=2)["latency_s_per_sample"] == pytest.approx(8.0 * 1e-7)
    assert fp["missing"] == []


def test_a_card_without_the_constants_says_which_are_missing():
    c = CostCounts(samples=1, macs=10, dac=1, adc=1, pulses=1, refreshes=0, host_flops=0, settle_time_tau=1.0, settle_steps=1.0, phases=1)
    s = cost_summary(load_card("ideal").cost, c, kind="ideal")
    assert s["energy_J_per_sample"] is None and s["latency_s_per_sample"] is None
    assert s["missing"] == ["e_adc_J", "e_dac_J", "e_mac_J", "e_pulse_J", "tau_s"]
    with pytest.raises(ConfigError, match="lacks the cost constant.*e_mac_J.*tau_s.*add them to its \\[cost\\] table"):
        cost_summary(CostConstants(e_dac_J=1e-13), c, kind="crossbar", strict=True)


def test_cost_constants_are_validated_and_sourced(tmp_path):
    with pytest.raises(ConfigError, match=r"\[cost\] tau_s=0.0 is out of range"):
        load_card("pcm", {"tau_s": 0.0})
    from importlib import resources

    text = (resources.files("mep_hw.cards") / "pcm.toml").read_text().replace('e_pulse_J = "', 'e_pulse_X = "')
    p = tmp_path / "nosource.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=r"\[sources\] names unknown field\(s\) e_pulse_X"):
        load_card(str(p))
    p.write_text(text.replace('e_pulse_X = "', 'e_pulse_Y_ignored = "').replace("e_pulse_Y_ignored", "# e_pulse"))
    with pytest.raises(ConfigError, match=r"\[cost\] field\(s\) e_pulse_J have no \[sources\] entry"):
        load_card(str(p))
    assert load_card("pcm", {"e_pulse_J": 2e-11}).cost.e_pulse_J == 2e-11


def test_host_flop_counts_by_hand():
    # EP estimate, batch 2, one 3×4 matrix: 2 phases × 2·2·3·4 + 2·12 (difference, scale) + biases 2·(2·2·3) + 2·3
    assert ep_estimate_flops(2, [(3, 4)]) == 2 * 48 + 24 + 2 * 12 + 6
    # Newton–Schulz on 2×3, one iteration: 3·6 + (2·4·3 + 2·8 + 3·4 + 2·4·3 + 2·6)
    assert newton_schulz_flops(2, 3, steps=1) == 18 + 24 + 16 + 12 + 24 + 12
    assert newton_schulz_flops(3, 2, steps=1) == newton_schulz_flops(2, 3, steps=1)  # works on the short side
    assert muon_flops(2, 3, steps=1) == 4 * 6 + newton_schulz_flops(2, 3, steps=1) + 3 * 6
    assert dion_flops(4, 6, 1) == 24 + 48 + int(2 * 4 - 2 / 3) + 48 + (48 + 24) + 18 + (48 + 24) + 48
    assert host_step_flops("adam", [(3, 4)], [3]) == 12 * 15
    assert host_step_flops("sgd", [(3, 4)], [3]) == 4 * 15
    assert host_step_flops("muon", [(3, 4)], [3]) == 12 * 3 + muon_flops(3, 4)
    assert host_step_flops("dion", [(500, 784)], [500]) == 12 * 500 + dion_flops(500, 784, 100)


@pytest.mark.slow
def test_a_hardware_run_records_its_cost(tmp_path):
    cfg = TrainConfig(dataset="digits", layers=(64, 12, 10), epochs=1, batch_size=50, limit_train=100, limit_test=40, device="pcm", lr=0.02)
    train(cfg, tmp_path / "r", progress=False)
    m = metrics(tmp_path / "r")
    cost, per_layer = m["cost"], m["pulses"]
    tr, inf = cost["train"], cost["inference"]
    macs = sum(p["macs"] for p in per_layer)
    assert tr["per_sample"]["macs"] * 100 + inf["per_sample"]["macs"] * 40 == pytest.approx(macs)
    # inference: the input array read once (64·12, held for the phase), the bottom-up initialisation of the
    # next layer (12·10), then one field evaluation (the 12→10 array forward and transposed) per settle step
    # and one at the start
    per_eval = 12 * 10 + 12 * 10
    steps = inf["per_sample"]["settle_steps"]
    assert inf["per_sample"]["macs"] == pytest.approx(64 * 12 + 12 * 10 + per_eval * (steps + 1))
    assert cost["macs_per_field_eval"] == per_eval
    assert tr["per_sample"]["pulses"] * 100 == sum(p["pulses_up"] + p["pulses_down"] for p in per_layer)
    assert tr["per_sample"]["host_flops"] == pytest.approx((ep_estimate_flops(50, [(12, 64), (10, 12)])
                                                            + host_step_flops("adam", [(12, 64), (10, 12)], [12, 10])) * 2 / 100)
    assert cost["missing"] == [] and tr["energy_J_per_sample"]["total"] > 0
    h = m["history"][-1]
    # settle time of the free and both nudged phases, plus the bottom-up pass (one read per layer), × τ
    tau = load_card("pcm").cost.tau_s
    assert tr["latency_s_per_sample"] == pytest.approx((h["free_time_mean"] + 2 * h["nudged_time_mean"] + 2) * tau)
    # the array's read energy is computed from the conductances it holds, not from a per-MAC constant
    assert tr["energy_J_per_sample"]["array"] == pytest.approx(tr["per_sample"]["read_J"]) and tr["per_sample"]["read_J"] > 0


def test_read_energy_is_v2_sum_g_t_on_a_hand_made_tile():
    """E = V_read²·t_read·Σ_b Σ_j f(x̃_bj)·Σ_i (G⁺_ij + G⁻_ij), f = |x̃| (pulse width) or x̃² (amplitude)."""
    from mep_hw.hw import CrossbarDevice, Periphery

    F64 = torch.float64
    for coding in ("pulse_width", "amplitude"):
        dev = CrossbarDevice(g_min_uS=0.0, g_max_uS=10.0, v_read_V=0.3, t_read_s=2e-7, input_coding=coding)
        t = Tile(dev, Periphery(), torch.zeros(2, 3, dtype=F64), seed=0)
        gp = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
        gm = torch.tensor([[0.5, 0.0, 1.0], [2.0, 0.0, 0.5]], dtype=F64)
        t.state = t.state._replace(gp=gp, gm=gm)
        t._changed()
        x = torch.tensor([[0.5, -1.0, 0.25], [1.0, 0.0, 0.5]], dtype=F64)
        t.mvm(x)
        f = [abs(v) if coding == "pulse_width" else v * v for v in x.flatten().tolist()]
        expected = 0.0
        for b in range(2):
            for j in range(3):
                col = sum(float(gp[i, j] + gm[i, j]) for i in range(2))
                expected += 0.3**2 * 2e-7 * f[b * 3 + j] * col * 1e-6
        assert t.energy_totals()["read_J"] == pytest.approx(expected, rel=1e-12)
        u = torch.tensor([[1.0, 0.5]], dtype=F64)  # the transpose read drives the rows
        t.mvm_t(u)
        rows = [sum(float(gp[i, j] + gm[i, j]) for j in range(3)) for i in range(2)]
        fu = [1.0, 0.5] if coding == "pulse_width" else [1.0, 0.25]
        expected += sum(0.3**2 * 2e-7 * fu[i] * rows[i] * 1e-6 for i in range(2))
        assert t.energy_totals()["read_J"] == pytest.approx(expected, rel=1e-12)


def test_static_power_and_write_energy_enter_the_cost():
    const = CostConstants(tau_s=1e-9, e_mac_J=1e-15, e_dac_J=0.0, e_adc_J=0.0, e_pulse_J=1.0)
    c = CostCounts(samples=2, macs=10, dac=0, adc=0, pulses=4, refreshes=0, host_flops=0, settle_time_tau=10.0,
                   settle_steps=10.0, phases=1, read_J=3e-12, write_J=8e-12, static_W=12.0)
    s = cost_summary(const, c, kind="optical_mzi", read_energy=True, write_energy=True)
    e = s["energy_J_per_sample"]
    assert e["array"] == pytest.approx(1.5e-12) and e["programming"] == pytest.approx(4e-12)
    assert e["static"] == pytest.approx(12.0 * 5 * 1e-9)  # P × (settle time per sample × τ)
    s = cost_summary(const, c, kind="optical_mzi")  # constants when the device does not model them
    assert s["energy_J_per_sample"]["array"] == pytest.approx(5 * 1e-15) and s["energy_J_per_sample"]["programming"] == pytest.approx(2.0)

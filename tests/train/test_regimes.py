"""Update regimes: the in-array update's expectation is the host's SGD step, Tiki-Taka on an ideal
symmetric device reduces to SGD, no host arithmetic for the in-array EP update, backprop on the
same store, and runs of each regime (learning, exact resume, errors)."""

import copy
import dataclasses
import math

import pytest
import torch

from mep_hw.ep import EPConfig, ep_gradients
from mep_hw.errors import ConfigError, DeviceError
from mep_hw.hw import TileStore, load_card
from mep_hw.hw.cost import NEURON_E_OP_J, NEURON_OPS_PER_UPDATE
from mep_hw.io.runs import load_checkpoint
from mep_hw.model import LayeredHopfield, one_hot
from mep_hw.settle import evals_per_step
from mep_hw.train import TrainConfig, train
from mep_hw.train.regimes import AnalogUpdate, Estimate, HostUpdate, TikiTakaUpdate
from tests.train.runs import metrics, run_interrupted, strip_times

F64 = torch.float64
SMALL = dict(dataset="digits", layers=(64, 32, 10), epochs=2, batch_size=50, limit_train=300, limit_test=100)


def setup(update="analog", dw=1e-4, **cfg):
    g = torch.Generator().manual_seed(0)
    m = LayeredHopfield((12, 8, 5), generator=g, dtype=F64)
    m.use_store(TileStore(load_card("ideal", {"dw_pulse": dw}), list(m.weights), seed=0, biases=list(m.biases)))
    c = TrainConfig(dataset="digits", device="ideal", update=update, lr=0.1, schedule="constant", pulse_bl=200, **cfg)
    x = torch.rand(16, 12, generator=g, dtype=F64)
    y = one_hot(torch.randint(0, 5, (16,), generator=g), 5, F64)
    res = ep_gradients(m, x, y, EPConfig(beta=0.5))
    (sa, ba), (sb, bb) = res.phases
    est = Estimate(res.grads, ((1.0, m.hebbian_terms(x, sa, ba, y)), (-1.0, m.hebbian_terms(x, sb, bb, y))), 1.0 / ((ba - bb) * 16))
    return m, c, res, est


@pytest.mark.slow
@pytest.mark.parametrize("phases", ["separate", "signed"])
def test_the_in_array_update_is_the_host_sgd_step_in_expectation(phases):
    m, cfg, res, est = setup(pulse_phases=phases)
    store = m.store
    start = [store.tiles[k].state for k in range(2)]
    host = [-0.1 * g for g in res.grads]  # SGD without momentum: W ← W − lr·ĝ, biases the same
    reps, total = 300, [torch.zeros_like(t.held()) for t in store.tiles]
    for r in range(reps):
        regime = AnalogUpdate(m, cfg, 10, seed=r)
        for k, t in enumerate(store.tiles):
            t.state = start[k]
            t._changed()
        before = [t.held().clone() for t in store.tiles]
        regime.apply(est)
        for k, t in enumerate(store.tiles):
            total[k] += t.held() - before[k]
    for k in range(2):
        mean = total[k] / reps
        expected = torch.cat([host[2 * k], host[2 * k + 1][:, None]], dim=1)
        cos = torch.nn.functional.cosine_similarity(mean.flatten(), expected.flatten(), dim=0)
        assert cos > 0.99, (k, float(cos))
        assert float(mean.norm() / expected.norm()) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("sampling", ["exact", "marginal"])
def test_signed_phases_pulse_the_input_layer_once_with_less_noise(sampling):
    """--pulse-phases signed: the first layer's two phases share the clamped input x, so its
    update Σ_b (d⁺ − d⁻) xᵀ goes as one signed train; the second layer keeps two trains. Same
    expectation (above), fewer pulses and less noise on the first layer: over repeats its
    deviation from the host step is several times smaller; the B·n_out subtractions are the
    neurons' (each holds its other phase), no host FLOPs."""
    m, cfg, res, est = setup(dw=1e-3, pulse_sampling=sampling)
    host = [-0.1 * g for g in res.grads]
    expected = torch.cat([host[0], host[1][:, None]], dim=1)
    start = [t.state for t in m.store.tiles]
    err, pulses, flops = {}, {}, {}
    for phases in ("separate", "signed"):
        c = cfg.replace(pulse_phases=phases)
        e2 = n = 0.0
        for r in range(20):
            for k, t in enumerate(m.store.tiles):
                t.state = start[k]
                t._changed()
            before = m.store.tiles[0].held().clone()
            regime = AnalogUpdate(m, c, 10, seed=r)
            o0 = m.store.tiles[0].op_counts()
            regime.apply(est)
            o1 = m.store.tiles[0].op_counts()
            n += float(o1.pulses_up + o1.pulses_down - o0.pulses_up - o0.pulses_down)
            e2 += float((m.store.tiles[0].held() - before - expected).square().sum())
        err[phases], pulses[phases], flops[phases] = (e2 / 20) ** 0.5, n / 20, (regime.host_flops(16),
                                                                                 regime.neuron_ops(16))
    assert flops == {"separate": (0, 0), "signed": (0, 16 * 8)}  # (host FLOPs, the neurons' subtractions)
    assert pulses["signed"] < pulses["separate"] / 3, pulses  # measured 4.7x fewer
    assert err["signed"] < err["separate"] / 1.6, err  # measured 2.2-2.3x smaller


def test_the_clip_warning_reads_the_pulse_probabilities_not_the_gains():
    """Update management makes C_d large for small errors (C_d = √(η/(BL·Δw)·m_x/m_d)); what can
    clip is the probability C_d·|d| = √(η/(BL·Δw)·m_x·m_d). A signed update of errors 10⁻³ has
    C_d ≈ 18 and probabilities ≈ 0.02: no warning (the former check of C alone warned); at a
    10⁴× larger rate the probabilities reach ≈ 2.2: a warning."""
    import warnings

    m, cfg, res, est = setup()
    g = torch.Generator().manual_seed(1)
    terms = [(1e-3 * (2 * torch.rand(16, 8, generator=g, dtype=F64) - 1), torch.rand(16, 12, generator=g, dtype=F64)),
             (1e-3 * (2 * torch.rand(16, 5, generator=g, dtype=F64) - 1), torch.rand(16, 8, generator=g, dtype=F64))]
    for scale, clips in ((1.0 / 16, False), (1e3, True)):
        e = Estimate(None, ((1.0, terms),), scale, signed=True)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            AnalogUpdate(m, cfg, 10, seed=0).apply(e)
        assert any("clip at 1" in str(x.message) for x in w) == clips, scale


@pytest.mark.parametrize("sampling", ["exact", "marginal"])
def test_with_bl_to_infinity_one_analog_update_converges_to_the_host_step(sampling):
    # η = Δw_min·BL·C²: at fixed η and C, BL ×64 makes Δw_min 64× finer and the update's noise
    # (std ∝ Δw_min·√BL) 8× smaller; a single draw, no averaging over repeats
    errs = []
    for bl in (16, 1024):
        m, cfg, res, est = setup(dw=0.016 / bl, pulse_sampling=sampling)
        cfg = cfg.replace(pulse_bl=bl)
        host = [-0.1 * g for g in res.grads]
        store = m.store
        before = [t.held().clone() for t in store.tiles]
        for t in store.tiles:  # the premise: no probability clips (C·max|·| ≤ 1)
            assert 0.1 * est.scale / t.w_scale / (bl * t.dw_pulse / t.w_scale) <= 1.0
        AnalogUpdate(m, cfg, 10, seed=7).apply(est)
        num = den = 0.0
        for k, t in enumerate(store.tiles):
            expected = torch.cat([host[2 * k], host[2 * k + 1][:, None]], dim=1)
            num += float((t.held() - before[k] - expected).square().sum())
            den += float(expected.square().sum())
        errs.append((num / den) ** 0.5)
    assert errs[1] < errs[0] / 4, errs  # ∝ 1/√BL: 8× expected
    assert errs[1] < 0.3, errs  # measured: 1.6 → 0.20 (exact and marginal)


def test_tiki_taka_on_an_ideal_symmetric_device_reduces_to_sgd():
    # every column transferred every step, A reset to its symmetry point after it is read, the
    # remainder of a pulse kept in H: C carries the SGD step (to within one pulse of C per weight)
    m, cfg, res, est = setup("tiki-taka", transfer_columns=13, transfer_fast_lr=0.1, transfer_lr=1.0)  # A at the SGD rate, all of it to C
    tt = TikiTakaUpdate(m, cfg, 10, seed=3)
    tt.cfg = tt.cfg._replace(reset_fast=True, max_pulses=10**6, forget=False, momentum=0.0)
    m2 = copy.deepcopy(m)
    sgd = AnalogUpdate(m2, cfg, 10, seed=3)  # the same coincidences, written straight to the weights
    c0 = [t.held().clone() for t in m.store.tiles]
    w0 = [t.held().clone() for t in m2.store.tiles]
    tt.apply(est)
    sgd.apply(est)
    for k in range(2):
        dc = m.store.tiles[k].held() - c0[k]
        dw = m2.store.tiles[k].held() - w0[k]
        pulse = m.store.tiles[k].dw_pulse
        assert (dc - dw).abs().max() <= pulse * (1 + 1e-9), k
        assert torch.allclose(tt.fast[k].held(), tt.sym[k])  # A back at its reference
        assert dw.abs().max() > 20 * pulse  # the step is many pulses: the check is not trivial


def test_tiki_taka_resets_the_fast_array_by_default_only_on_a_device_without_a_leak():
    """Without a pull to its symmetry point A integrates the update and C integrates A: the same
    estimate applied k times moves C by ∝ k(k+1)/2 steps instead of ∝ k (a double integrator; on
    10k MNIST the ideal card's Tiki-Taka fell from 81.7 % to 72.8 % in its second epoch). So the
    default resets A's read columns where the device has no leak (the ideal card), nowhere else."""
    def make(card, **kw):
        return TrainConfig(dataset="digits", device=card, update="tiki-taka", **kw)

    assert make("ideal").transfer_reset is True and make("ideal", transfer_reset=False).transfer_reset is False
    for card in ("pcm", "reram_taox", "reram_agsi", "ecram", "fefet"):
        assert make(card).transfer_reset is False, card
    assert TrainConfig(dataset="digits", device="ideal", update="analog").transfer_reset is False
    m, cfg, res, est = setup("tiki-taka", transfer_columns=13, transfer_fast_lr=0.1, transfer_lr=1.0,
                             transfer_max_pulses=10**6, transfer_forget=False, transfer_momentum=0.0)
    assert cfg.transfer_reset is True
    ratio = {}
    for reset in (True, False):
        mm = copy.deepcopy(m)
        tt = TikiTakaUpdate(mm, dataclasses.replace(cfg, transfer_reset=reset), 10, seed=3)
        c0 = mm.store.tiles[0].held().clone()
        moved = []
        for _ in range(4):
            tt.apply(est)
            moved.append(float((mm.store.tiles[0].held() - c0).norm()))
        ratio[reset] = moved[3] / moved[1]  # after 4 vs after 2 applications: 2 for SGD, 10/3 for the double integral
    assert ratio[True] == pytest.approx(2.0, rel=0.1)
    assert ratio[False] == pytest.approx(10 / 3, rel=0.1)


@pytest.mark.parametrize("scaled", [True, False])
def test_the_transfer_rate_follows_the_schedule(monkeypatch, scaled):
    """aihwkit's scale_transfer_lr: with the cosine schedule the transfer at step t uses
    transfer_lr × lr(t)/lr; with --no-transfer-scaled it stays transfer_lr."""
    from mep_hw.train import regimes

    m, cfg, res, est = setup("tiki-taka", transfer_columns=13, transfer_lr=0.4)
    cfg = dataclasses.replace(cfg, transfer_scaled=scaled, schedule="cosine")
    tt = TikiTakaUpdate(m, cfg, 4, seed=3)
    seen = []
    orig = regimes.transfer_step

    def spy(a, c, st, tcfg, sym):
        seen.append(tcfg.lr)
        return orig(a, c, st, tcfg, sym)

    monkeypatch.setattr(regimes, "transfer_step", spy)
    for _ in range(4):
        tt.apply(est)
    per_step = seen[:: len(m.store.tiles)]
    expected = [0.4 * 0.5 * (1 + math.cos(math.pi * t / 4)) if scaled else 0.4 for t in range(4)]
    assert per_step == pytest.approx(expected, rel=1e-12)


def _settle_ops(m: dict) -> float:
    """Per training sample, the neurons' state updates the cost model counts: 4 per unit and field
    evaluation (leak, integrate, step, clip) and one per unit for the bottom-up initialisation."""
    per = m["cost"]["train"]["per_sample"]
    units = sum(m["config"]["layers"][1:])  # mse: the hidden and the output units are states
    solver = TrainConfig.from_dict(m["config"]).settle_solver  # "auto" resolved
    return units * (NEURON_OPS_PER_UPDATE * per["settle_steps"] * evals_per_step(solver) + 1)


@pytest.mark.parametrize("phases", ["separate", "signed"])
def test_the_in_array_ep_update_does_no_host_arithmetic(tmp_path, phases):
    """Zero host FLOPs in the analog regime with either phase mode; the neurons' operations are
    the settles' state updates plus, with signed phases, one subtraction per hidden unit (the
    first layer's postsynaptic neurons, 32 here) and sample, charged at the neuron-op energy."""
    m, cfg, res, est = setup()
    assert AnalogUpdate(m, cfg, 10).host_flops(16) == 0
    train(TrainConfig(**SMALL, device="ideal", update="analog", lr=0.05, pulse_phases=phases), tmp_path / "a",
          progress=False)
    mm = metrics(tmp_path / "a")
    cost = mm["cost"]["train"]
    per = cost["per_sample"]
    assert per["host_flops"] == 0 and per["pulses"] > 0 and per["settle_steps"] > 0
    assert per["neuron_ops"] == pytest.approx(_settle_ops(mm) + (32 if phases == "signed" else 0), rel=1e-9)
    if cost["energy_J_per_sample"] is not None:
        assert cost["energy_J_per_sample"]["neurons"] == pytest.approx(per["neuron_ops"] * NEURON_E_OP_J, rel=1e-9)


@pytest.mark.parametrize("update", ["analog", "tiki-taka"])
@pytest.mark.slow
def test_an_in_array_run_learns_and_resumes_exactly(tmp_path, update):
    cfg = TrainConfig(**SMALL, device="ideal", update=update, lr=0.35, transfer_lr=0.2)
    res = train(cfg, tmp_path / "full", progress=False)
    if update == "analog":
        assert res.test_accuracy > 0.25  # chance is 0.1 (12 steps of plain SGD)
    run_interrupted(cfg, tmp_path / "cut", epoch=2, batch=1)
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert strip_times(metrics(tmp_path / "full")["history"]) == strip_times(metrics(tmp_path / "cut")["history"])


@pytest.mark.parametrize("update", ["host", "analog"])
def test_backprop_on_the_same_store_learns(tmp_path, update):
    cfg = TrainConfig(**{**SMALL, "epochs": 3}, device="ideal", method="backprop", update=update,
                      lr=0.25 if update == "analog" else 1e-2, pulse_bl=100)
    res = train(cfg, tmp_path / update, progress=False)
    assert res.test_accuracy > 0.45  # chance is 0.1 (18 steps)
    m = metrics(tmp_path / update)
    h = m["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    # the neurons' work: forward activations (one per hidden unit; the output is linear), the loss
    # gradient (2 per output) and δ ⊙ ρ'(a) (2 per hidden unit) per sample; inference: the forward
    # activations; the host works only in the host regime
    per = m["cost"]["train"]["per_sample"]
    assert per["neuron_ops"] == pytest.approx(32 + 2 * 10 + 2 * 32, rel=1e-12)
    assert m["cost"]["inference"]["per_sample"]["neuron_ops"] == pytest.approx(32, rel=1e-12)
    # the host regime: backprop's outer products (one phase: 2·o·i + 2·o per sample) and Adam's
    # step (12 per parameter, over the 6 steps' samples) — not EP's two-phase estimate as well
    shapes = [(32, 64), (10, 32)]
    step = 12 * sum(o * i + o for o, i in shapes) * 6 / 300
    expected = sum(2 * o * i + 2 * o for o, i in shapes) + step if update == "host" else 0
    assert per["host_flops"] == pytest.approx(expected, rel=1e-12)


def test_in_array_regimes_need_a_pulsed_device(tmp_path):
    with pytest.raises(ConfigError, match="--update analog applies the update in the array: give the device with --device"):
        TrainConfig(**SMALL, update="analog")
    with pytest.raises(DeviceError, match="no pulse"):
        train(TrainConfig(**SMALL, device="fpga_q16", update="analog"), tmp_path / "f", progress=False)


def test_layer_lr_scales_follow_the_wider_side_above_lr_width():
    from mep_hw.train.config import layer_lr_scales

    assert layer_lr_scales((784, 500, 500, 10), "mse", 500) == (1.0, 1.0, 1.0)
    assert layer_lr_scales((784, 2000, 2000, 10), "mse", 500) == (1.0, 0.25, 0.25)
    # a ce readout is read one way only: its fan-in counts
    assert layer_lr_scales((784, 1000, 1000, 10), "ce", 500) == (1.0, 0.5, 0.5)
    assert layer_lr_scales((784, 2000, 2000, 10), "mse", 0) == (1.0, 1.0, 1.0)
    # the default base width (docs/ep.md, "Width and depth"): the readout of a 500-wide net at lr/4
    from mep_hw.train import TrainConfig

    cfg = TrainConfig(layers="784,500,500,10")
    assert cfg.lr_width == 125 and layer_lr_scales(cfg.layers, cfg.cost, cfg.lr_width) == (1.0, 0.25, 0.25)


def test_a_conv_net_takes_the_layer_rule_on_its_state_sizes():
    """The kernels are (C_out, C_in·k·k) matrices; their rates follow the state sizes (the
    measured choice, docs/conv.md "Learning rates of a conv net"), biases at lr."""
    from mep_hw.train.loop import build_model

    cfg = TrainConfig(dataset="fashion-mnist", arch="conv:32:5,pool:2,conv:64:5,pool:2,fc:10", cost="ce")
    m = build_model(cfg, (1, 28, 28), 10)
    assert m.layers == (784, 4608, 1024, 10)
    groups = cfg.param_groups(m)
    assert [g["lr"] for g in groups] == pytest.approx([0.03, 0.03 * 125 / 4608, 0.03 * 125 / 1024, 0.03])
    assert [p for g in groups[:3] for p in g["params"]] == list(m.weights)
    assert groups[3]["params"] == list(m.biases)
    one = cfg.replace(lr_width=0).param_groups(m)
    assert len(one) == 1 and one[0]["lr"] == 0.03 and len(one[0]["params"]) == 6
    # a layer after the second pooled conv layer counts the widest state below it (4608), not its
    # own two sides (1024): at lr·125/1024 a hidden fc or a third conv layer stalls the net
    for arch, layers in (("conv:32:5,pool:2,conv:64:5,pool:2,fc:256,fc:10", (784, 4608, 1024, 256, 10)),
                         ("conv:32:5,pool:2,conv:64:5,pool:2,conv:128:3,fc:10", (784, 4608, 1024, 512, 10))):
        deep = cfg.replace(arch=arch)
        m = build_model(deep, (1, 28, 28), 10)
        assert m.layers == layers
        assert [g["lr"] for g in deep.param_groups(m)][:4] == pytest.approx(
            [0.03, 0.03 * 125 / 4608, 0.03 * 125 / 4608, 0.03 * 125 / layers[3]])
    # dense nets keep the two sides' rule
    from mep_hw.train.config import layer_lr_scales

    assert layer_lr_scales((784, 2000, 500, 500, 10), "mse", 125) == (1.0, 125 / 2000, 125 / 500, 125 / 500)


def test_the_host_regime_steps_each_matrix_at_its_layer_lr():
    """One Adam step moves every weight by ≈ its group's lr (the first Adam step is lr·sign(g))."""
    m = LayeredHopfield((12, 40, 40, 5), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(dataset="digits", lr=1e-3, lr_width=20, schedule="constant")
    reg = HostUpdate(m, cfg, steps_total=10)
    before = [w.detach().clone() for w in m.weights]
    b_before = [b.detach().clone() for b in m.biases]
    grads = [torch.ones_like(p) for p in m.param_list()]
    reg.apply(Estimate(grads))
    moved = [float((w.detach() - b).abs().max()) for w, b in zip(m.weights, before)]
    assert moved == pytest.approx([1e-3, 1e-3 * 20 / 40, 1e-3 * 20 / 40], rel=1e-3)
    assert [float((b.detach() - b0).abs().max()) for b, b0 in zip(m.biases, b_before)] == pytest.approx([1e-3] * 3, rel=1e-3)

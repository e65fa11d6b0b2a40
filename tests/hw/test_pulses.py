"""Stochastic pulse coincidence (Gokmen & Vlasov 2016): expectation = the scaled outer product,
variance = the Bernoulli-sum formula, signs, and update management."""

import math

import pytest
import torch

from mep_hw.errors import ConfigError
from mep_hw.hw.pulses import coincidences, coincidences_marginal, update_management

F64 = torch.float64


@pytest.mark.parametrize("sampler", [coincidences, coincidences_marginal])
@pytest.mark.parametrize("cx,cd", [(0.7, 0.5), (1.6, 0.9)])  # the second clips probabilities at 1
@pytest.mark.slow
def test_coincidence_counts_have_the_expectation_and_variance_of_their_formula(cx, cd, sampler):
    # R independent replicas in one call: x and d tiled R times; the diagonal blocks of the
    # (3R × 4R) count matrix are cells with their own row and column trains
    g = torch.Generator().manual_seed(0)
    x1 = torch.tensor([0.1, 0.5, 0.9, 1.0], dtype=F64)
    d1 = torch.tensor([0.2, 0.6, 1.0], dtype=F64)
    B, bl, R = 40, 10, 1500
    up = sampler(x1.repeat(R).expand(B, 4 * R), d1.repeat(R).expand(B, 3 * R), bl=bl, cx=cx, cd=cd, generator=g).up
    counts = up.reshape(R, 3, R, 4).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (R, 3, 4)
    pq = torch.outer((cd * d1).clamp(max=1), (cx * x1).clamp(max=1))
    mean = B * bl * pq
    var = B * bl * pq * (1 - pq)
    se = (var / R).sqrt()
    assert ((counts.mean(0) - mean).abs() <= 4 * se + 1e-12).all()
    ok = var > 0
    assert ((counts.var(0)[ok] / var[ok] - 1).abs() < 0.12).all()  # R = 1500: the variance's relative se ≈ 3.7 %
    assert (counts.var(0)[~ok] == 0).all()


@pytest.mark.parametrize("sampler", [coincidences, coincidences_marginal])
def test_signs_decide_the_direction(sampler):
    g = torch.Generator().manual_seed(1)
    x = torch.tensor([[1.0, -1.0]], dtype=F64)
    d = torch.tensor([[1.0, -1.0, 0.0]], dtype=F64)
    c = sampler(x, d, bl=7, cx=1.0, cd=1.0, generator=g)  # probabilities 1: every slot fires
    assert c.up.tolist() == [[7, 0], [0, 7], [0, 0]]
    assert c.down.tolist() == [[0, 7], [7, 0], [0, 0]]


def test_update_management_gives_the_learning_rate_and_balances_the_maxima():
    cx, cd = update_management(0.01, 10, 0.002, x_max=1.0, d_max=0.25)
    assert 0.002 * 10 * cx * cd == pytest.approx(0.01)
    assert cx * 1.0 == pytest.approx(cd * 0.25)  # equal top probabilities
    with pytest.raises(ConfigError, match="dw_min > 0"):
        update_management(0.01, 10, 0.0, 1.0, 1.0)
    with pytest.raises(ConfigError, match="BL=0 must be ≥ 1"):
        coincidences(torch.ones(1, 2), torch.ones(1, 2), bl=0, cx=1, cd=1, generator=torch.Generator())
    assert math.isfinite(update_management(0.0, 10, 0.1, 0.0, 0.0)[0])


@pytest.mark.parametrize("forget", [True, False])
def test_tiki_taka_buffer_keeps_momentum_times_the_transfer(forget):
    """aihwkit's BufferedTransferCompound: after a transfer of n pulses the buffer is reset to
    momentum·n (forget_buffer) or loses (1 − momentum)·n; cells that did not transfer keep H."""
    from mep_hw.hw import IdealDevice, Periphery, Tile
    from mep_hw.hw.transfer import TransferConfig, TransferState, transfer_step

    W = torch.zeros(3, 4, dtype=torch.float64)
    W[0, 0] = 1.0  # sets w_scale = 1 (× headroom): the fast and slow tiles share the mapping
    fast = Tile(IdealDevice(dw_pulse=0.01), Periphery(), W, seed=0)
    slow = Tile(IdealDevice(dw_pulse=0.01), Periphery(), W, seed=1)
    sym = torch.zeros(3, 4, dtype=torch.float64)
    dw_c = slow.dw_pulse
    # A holds 2.5 C-pulses in cell (0, 1) and 0.4 in (1, 2): one transfers (clipped to 1), one not
    a = torch.zeros(3, 4, dtype=torch.float64)
    a[0, 1], a[1, 2] = 2.5 * dw_c, 0.4 * dw_c
    fast.program(a)
    cfg = TransferConfig(columns=4, lr=1.0, max_pulses=1, momentum=0.1, forget=forget)
    c0 = slow.held().clone()
    st, flops = transfer_step(fast, slow, TransferState(torch.zeros(3, 4, dtype=torch.float64), 0), cfg, sym)
    dc = (slow.held() - c0) / dw_c
    assert torch.allclose(dc[0, 1], torch.tensor(1.0, dtype=torch.float64)) and dc.abs().sum() == pytest.approx(1.0)
    expected = 0.1 * 1.0 if forget else 2.5 - 0.9 * 1.0
    assert float(st.H[0, 1]) == pytest.approx(expected, abs=1e-9)
    assert float(st.H[1, 2]) == pytest.approx(0.4, abs=1e-9)  # below one pulse: kept in the buffer
    assert flops == 5 * 3 * 4 and st.next_col == 0


def test_tiki_taka_reads_the_fast_array_against_its_symmetry_point_before_the_adc():
    """With A exactly at its reference and no read noise, the transfer reads zero: the 8-bit
    ADC quantises A − A_sym, so nothing accumulates in H and C takes no pulse in 50 transfers.
    Subtracting the symmetry point after the ADC (the read of A, then − A_sym) leaves each cell's
    rounding error of A_sym — a constant that H integrates; and a column offset by k ADC steps
    reads as k steps."""
    import dataclasses

    from mep_hw.hw import NoiseBank, Tile, load_card
    from mep_hw.hw.transfer import TransferConfig, TransferState, transfer_step

    card = load_card("ecram", {"read_noise": 0.0})
    per = dataclasses.replace(card.periphery, out_noise=0.0)
    g = torch.Generator().manual_seed(0)
    W = (torch.rand(20, 30, generator=g, dtype=torch.float64) - 0.5) * 0.2
    fast = Tile(card.device, per, W, seed=1, noise=NoiseBank(2))
    slow = Tile(card.device, per, W, seed=3, noise=NoiseBank(4))
    sym = fast.held().clone()  # A exactly at its reference (as if programmed to its symmetry point)
    E = torch.eye(30, dtype=torch.float64)
    assert torch.count_nonzero(fast.mvm_ref(E, sym)) == 0
    after_adc = fast.mvm(E).T - sym  # the old read: rounding errors of the symmetry point
    assert float(after_adc.abs().max()) > 0.2 * per.adc_step * fast.w_scale * fast.in_scale
    cfg = TransferConfig(columns=30, lr=1.0, max_pulses=5)
    st, c0 = TransferState(torch.zeros(20, 30, dtype=torch.float64), 0), slow.held().clone()
    for _ in range(50):
        st, _ = transfer_step(fast, slow, st, cfg, sym)
    assert torch.count_nonzero(st.H) == 0 and torch.equal(slow.held(), c0)
    # an offset of 3 ADC steps in one column reads back as 3 steps
    step = fast._alpha  # logical units per ADC code
    shifted = sym.clone()
    shifted[:, 4] -= 3 * step
    v = fast.mvm_ref(E, shifted).T
    assert torch.allclose(v[:, 4], torch.full((20,), 3 * step, dtype=torch.float64))
    assert torch.count_nonzero(v[:, :4]) == 0

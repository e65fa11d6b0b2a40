"""The weight store: one place where weights live, are read and written (ideal and tile-backed),
the output-sampled read against the per-cell reference, and the input read once per phase."""

import copy

import pytest
import torch

from mep_hw.errors import ConfigError
from mep_hw.hw import IdealStore, OpCounts, Tile, TileStore, build_store, load_card
from mep_hw.model import LayeredHopfield

F64 = torch.float64


def net(layers=(12, 8, 5), cost="mse", dtype=torch.float32):
    return LayeredHopfield(layers, cost=cost, generator=torch.Generator().manual_seed(0), dtype=dtype)


def test_op_counts_add_and_subtract_field_by_field():
    a, b = OpCounts(1, 2, 3, 4, 5, 6, 7), OpCounts(10, 20, 30, 40, 50, 60, 70)
    assert a + b == OpCounts(11, 22, 33, 44, 55, 66, 77)
    assert b - a == OpCounts(9, 18, 27, 36, 45, 54, 63)
    assert (a + b).pulses == 44 + 55


@pytest.mark.slow
def test_the_ideal_store_writes_exactly_and_the_host_params_are_its_weights():
    m = net()
    st = m.store
    assert isinstance(st, IdealStore) and st.exact and st.index(m.weights[1]) == 1 and st.index(m.biases[0]) is None
    delta = torch.full_like(m.weights[0], 0.25)
    w0 = m.weights[0].detach().clone()
    assert st.writer(m.weights[0], delta) is delta
    torch.testing.assert_close(m.weights[0].detach(), w0 + 0.25)
    b0 = m.biases[0].detach().clone()
    st.writer(m.biases[0], torch.ones_like(b0))  # not a matrix of the store: exact, on the host
    torch.testing.assert_close(m.biases[0].detach(), b0 + 1)
    x = torch.rand(3, 12)
    torch.testing.assert_close(st.ops[0].mvm(x), x @ m.weights[0].detach().T)


def test_a_tile_store_is_the_only_copy_and_returns_what_it_achieved():
    m = net()
    st = TileStore(load_card("pcm", {"levels": 16}), list(m.weights), seed=3)
    m.use_store(st)
    for k, w in enumerate(m.weights):
        assert w.data_ptr() == st.held(k).data_ptr()  # the parameter is the tile's held weight, no copy
    before = st.held(0).clone()
    intended = torch.full_like(before, 0.05)
    achieved = st.apply(0, intended)
    torch.testing.assert_close(achieved, st.held(0) - before)
    assert not torch.allclose(achieved, intended)  # whole pulses of a 16-level device, with noise
    assert st.counts(0).pulses_up > 0 and st.counts(1).pulses_up == 0
    assert m.weights[0].data_ptr() == st.held(0).data_ptr()


def test_a_store_must_hold_the_networks_own_matrices():
    m, other = net(), net()
    with pytest.raises(ConfigError, match="this network's weight matrices"):
        m.use_store(IdealStore(list(other.weights)))


def test_a_tile_store_round_trips_its_state_exactly():
    m = net()
    st = TileStore(load_card("reram_taox"), list(m.weights), seed=1)
    m.use_store(st)
    x = torch.rand(4, 12)
    st.apply(0, torch.randn_like(st.held(0)) * 0.02)
    saved = copy.deepcopy(st.state_dict())
    ref = [st.apply(0, torch.full_like(st.held(0), 0.01)).clone(), st.ops[1].mvm(torch.rand(4, 8)).clone()]
    m2 = net()
    st2 = TileStore(load_card("reram_taox"), list(m2.weights), seed=99)
    st2.load_state_dict(saved)
    torch.testing.assert_close(st2.held(0), st.held(0) - ref[0])
    again = st2.apply(0, torch.full_like(st2.held(0), 0.01))
    c2, c1 = st2.counts(), st.counts()
    assert torch.equal(again, ref[0]) and c2[:7] == (c1 - OpCounts(macs=4 * 8 * 5, dac=4 * 8, adc=4 * 5))[:7]
    # energies round-trip too: the only difference is the read made after the save
    assert c2.write_J == pytest.approx(c1.write_J, rel=1e-12) and 0 <= c2.read_J < c1.read_J
    del x


@pytest.mark.parametrize("x_scale", [1.0, 0.3])
@pytest.mark.slow
def test_the_output_sampled_read_equals_the_per_cell_read_in_distribution(x_scale):
    # per-cell read noise σ_ij i.i.d. per read: the output noise has variance Σ_j σ_ij² x_j². The fast
    # path samples it at the outputs; the reference draws every cell. Same mean and std within 5 %.
    card = load_card("pcm", {"read_noise": 0.05, "dac_bits": 0, "adc_bits": 0, "out_noise": 0.0})
    W = torch.randn(6, 40, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.1
    x = (torch.rand(1, 40, generator=torch.Generator().manual_seed(1), dtype=F64) * x_scale).expand(20000, 40).contiguous()
    fast = Tile(card.device, card.periphery, W, seed=5, name="fast")
    ref = Tile(card.device, card.periphery, W, seed=5, name="ref", read="per_cell")
    torch.testing.assert_close(fast.held(), ref.held())
    yf, yr = fast.mvm(x), ref.mvm(x)
    torch.testing.assert_close(yf.mean(0), yr.mean(0), atol=4 * float(yr.std(0).max()) / 20000**0.5, rtol=0)
    torch.testing.assert_close(yf.std(0), yr.std(0), rtol=0.05, atol=0)
    # and the transpose read from the same cells
    u = torch.rand(20000, 6, dtype=F64)
    tf, tr = fast.mvm_t(u), ref.mvm_t(u)
    torch.testing.assert_close((tf - u @ fast.held()).std(0), (tr - u @ ref.held()).std(0), rtol=0.05, atol=0)


def test_the_per_cell_reference_is_a_named_read_model():
    card = load_card("pcm")
    with pytest.raises(ConfigError, match="read='cell' is not a read model; choose one of: output, per_cell"):
        Tile(card.device, card.periphery, torch.zeros(2, 3), seed=0, read="cell")


def test_the_input_array_is_read_once_per_phase_and_the_readout_through_the_store():
    m = net((12, 8, 6, 5), cost="ce")
    st = TileStore(load_card("pcm", {"levels": 16}), list(m.weights), seed=0)
    m.use_store(st)
    x = torch.rand(7, 12)
    dyn = m.dynamics(x)
    reads0 = st.counts(0).macs
    assert reads0 == 7 * 12 * 8  # one read when the phase starts
    s = torch.cat(m.forward_init(dyn), 1)
    for _ in range(5):
        s = s + dyn.field(s)
    assert st.counts(0).macs == reads0  # held for the phase: no more reads of the input array
    nudged = dyn.nudge(torch.full((14, 1), 0.5), torch.zeros(14, 5))
    assert st.counts(0).macs == reads0 + 14 * 12 * 8  # a new phase reads it again
    assert nudged.input_drive.shape == (14, 8)
    readout = st.counts(2).macs
    logits = m.logits(list(torch.split(s, [8, 6], dim=1)))
    assert st.counts(2).macs == readout + 7 * 6 * 5  # the CE readout is a read of its array
    exact = m.store.ops[2].device.mean(m.store.ops[2].state) * m.store.ops[2].w_scale
    assert not torch.allclose(logits, torch.split(s, [8, 6], 1)[1] @ exact.T + m.biases[2].detach())  # noisy, converted


def test_the_noise_floor_is_zero_on_exact_weights_and_positive_on_a_noisy_card():
    m = net()
    assert m.noise_floor() == 0.0 and m.dynamics(torch.rand(2, 12)).noise_floor == 0.0
    m.use_store(build_store(load_card("pcm"), list(m.weights), seed=0))
    assert m.noise_floor() > 0 and m.dynamics(torch.rand(2, 12)).noise_floor == m.noise_floor()
    m2 = net()
    m2.use_store(build_store(load_card("ideal"), list(m2.weights), seed=0))
    assert m2.noise_floor() == 0.0  # the ideal card's tiles: exact reads


@pytest.mark.parametrize("n_out,batch", [(10, 100), (3, 40), (32, 64), (33, 64), (10, 5)])
def test_exact_read_of_a_narrow_matrix_is_the_product(n_out, batch):
    """ExactOp.mvm computes a read with few outputs as (W·xᵀ)ᵀ on the CPU (faster there): the same
    product as x·Wᵀ (+ the added term) up to float32 summation order."""
    from mep_hw.hw.store import ExactOp

    g = torch.Generator().manual_seed(n_out)
    W, x = torch.randn(n_out, 300, generator=g), torch.rand(batch, 300, generator=g)
    b, d = torch.randn(n_out, generator=g), torch.randn(batch, n_out, generator=g)
    op = ExactOp(W)
    torch.testing.assert_close(op.mvm(x), x @ W.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(op.mvm(x, b), x @ W.T + b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(op.mvm(x, d), x @ W.T + d, rtol=1e-5, atol=1e-5)
    xd = x.double()
    torch.testing.assert_close(ExactOp(W.double()).mvm(xd, b.double()), xd @ W.double().T + b.double(), rtol=1e-12, atol=1e-12)

"""Device cards (every card loads; bad cards name the field) and tiles (ideal limits, noise
bank, reproducibility)."""

import math

import pytest
import torch

from mep_hw.errors import ConfigError
from mep_hw.hw import (
    CrossbarDevice,
    FixedPointDevice,
    IdealDevice,
    NoiseBank,
    OpticalMZI,
    Periphery,
    Tile,
    KINDS,
    card_names,
    list_cards,
    load_card,
)

F64 = torch.float64
EXPECTED = {"ideal", "pcm", "reram_taox", "reram_agsi", "reram_agsi_measured", "ecram", "fefet", "mzi", "fpga_q16"}


def test_every_shipped_card_loads_with_a_source():
    names = set(card_names())
    assert EXPECTED <= names
    for card in list_cards():
        assert card.source.strip() and card.description.strip(), card.name
        assert card.kind in KINDS
        for field in card.sources:
            assert hasattr(card.device, field) or hasattr(card.periphery, field) or hasattr(card.cost, field), (card.name, field)
        d = card.to_dict()
        assert d["name"] == card.name and "device" in d and "periphery" in d


def test_every_device_kind_has_a_shipped_card():
    assert {c.kind for c in list_cards()} == set(KINDS)


def test_the_figure_overrides_work_on_every_crossbar_card():
    for card in list_cards():
        if card.kind != "crossbar":
            continue
        c = load_card(card.name, {"levels": 16, "read_noise": 0.02, "dac_bits": 8, "adc_bits": 8})
        assert (c.device.levels, c.device.read_noise, c.periphery.dac_bits, c.periphery.adc_bits) == (16, 0.02, 8, 8)


def write(tmp_path, text):
    p = tmp_path / "card.toml"
    p.write_text(text)
    return str(p)


GOOD = 'name = "x"\nkind = "crossbar"\nsource = "a paper, 2024, Table 1"\n[device]\ng_max_uS = 10.0\n'


@pytest.mark.parametrize(
    "text,match",
    [
        (GOOD.replace('source = "a paper, 2024, Table 1"\n', ""), "no 'source'"),
        (GOOD + "colour = 3\n", r"\[device\]: unknown field\(s\) colour; valid fields: .*g_max_uS"),
        (GOOD.replace("g_max_uS = 10.0", "g_max_uS = -5.0"), r"g_max_uS=-5.0 is out of range: expected a number in \(0.0, ∞\]"),
        (GOOD.replace("g_max_uS = 10.0", "read_noise = 11.0"), r"read_noise=11.0 is out of range: expected a number in \[0.0, 10.0\]"),
        (GOOD.replace('kind = "crossbar"', 'kind = "memristor"'), "kind='memristor' is not valid; choose one of: ideal, crossbar"),
        (GOOD + "[periphery]\nadc_bits = 99\n", r"\[periphery\]: adc_bits=99 must be 0"),
        ("name = \n", "is not valid TOML"),
        (GOOD + "[sources]\nnope = 'x'\n", r"\[sources\] names unknown field\(s\) nope"),
        (GOOD, r"\[device\] field\(s\) g_max_uS have no \[sources\] entry"),
        (GOOD + 'response = "table"\ntable_file = "missing.csv"\n', r"table_file 'missing.csv' is not a file beside the card"),
        ('vendor = "x"\n' + GOOD, r"unknown key\(s\) vendor"),
    ],
)
def test_bad_cards_fail_naming_the_field(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_card(write(tmp_path, text))


def test_bad_names_and_overrides():
    with pytest.raises(ConfigError, match="unknown device 'nope'; shipped cards: .*pcm"):
        load_card("nope")
    with pytest.raises(ConfigError, match="--set colour: no such field on a crossbar card"):
        load_card("pcm", {"colour": 1})
    with pytest.raises(ConfigError, match="levels=1 is out of range"):
        load_card("pcm", {"levels": 1})


def test_noise_bank_statistics_and_independence():
    bank = NoiseBank(3, size=1 << 20, dtype=F64)
    draws = torch.stack([bank.normal((1000,)) for _ in range(200)])
    assert abs(float(draws.mean())) < 0.01 and abs(float(draws.std()) - 1) < 0.01
    c = draws - draws.mean()
    assert abs(float((c[1:] * c[:-1]).mean())) < 0.01  # consecutive reads are independent
    assert torch.equal(NoiseBank(3, size=1 << 20, dtype=F64).normal((5,)), NoiseBank(3, size=1 << 20, dtype=F64).normal((5,)))


@pytest.mark.parametrize(
    "device",
    [CrossbarDevice(), OpticalMZI(mesh_size=8), FixedPointDevice(weight_bits=32, weight_frac=28, act_bits=32, act_frac=24, acc_bits=53)],
)
def test_every_device_at_its_ideal_limit_equals_the_ideal_device(device):
    W = torch.randn(6, 9, generator=torch.Generator().manual_seed(4), dtype=F64) * 0.3
    x = torch.rand(5, 9, generator=torch.Generator().manual_seed(5), dtype=F64)
    ideal = Tile(IdealDevice(), Periphery(), W, seed=0)
    t = Tile(device, Periphery(), W, seed=0)
    tol = 1e-6 if isinstance(device, FixedPointDevice) else 1e-10
    assert float((t.held() - ideal.held()).abs().max()) < tol
    assert float((t.mvm(x) - ideal.mvm(x)).abs().max()) < 1e-5
    assert float((t.mvm_t(x[:, :6]) - ideal.mvm_t(x[:, :6])).abs().max()) < 1e-5


def test_the_same_seed_reproduces_a_noisy_tile():
    card = load_card("pcm", {"levels": 16})
    W = torch.randn(20, 30, generator=torch.Generator().manual_seed(6)) * 0.1
    x = torch.rand(8, 30, generator=torch.Generator().manual_seed(7))
    outs = []
    for _ in range(2):
        t = Tile(card.device, card.periphery, W, seed=11, noise=NoiseBank(12))
        t.write(torch.full_like(W, 0.01))
        outs.append((t.held().clone(), t.mvm(x).clone(), t.op_counts()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]) and outs[0][2] == outs[1][2]
    t3 = Tile(card.device, card.periphery, W, seed=13, noise=NoiseBank(12))
    assert not torch.equal(t3.held(), outs[0][0])


def test_dac_and_adc_quantise_the_mvm():
    W = torch.randn(4, 50, generator=torch.Generator().manual_seed(8), dtype=F64) * 0.2
    t = Tile(IdealDevice(), Periphery(dac_bits=4, adc_bits=6, adc_bound=3.0), W, seed=0)
    x = torch.rand(100, 50, generator=torch.Generator().manual_seed(9), dtype=F64)
    y = t.mvm(x)
    step = 2 * 3.0 / 62 * t.w_scale
    assert torch.allclose(y / step, (y / step).round(), atol=1e-9)  # ADC codes
    assert float(y.abs().max()) <= 3.0 * t.w_scale + 1e-12  # saturates at the bound
    xq = (x * 7).round() / 7  # 4-bit DAC over [−1, 1]: step 2/14
    exact = ((xq @ (W.T / t.w_scale)).clamp(-3, 3) / (6 / 62)).round() * (6 / 62) * t.w_scale
    torch.testing.assert_close(y, exact)
    assert math.isclose(t.periphery.adc_step, 6 / 62)


def test_the_held_dac_codes_follow_an_input_modified_in_place():
    W = torch.randn(4, 50, generator=torch.Generator().manual_seed(8), dtype=F64) * 0.2
    t = Tile(IdealDevice(), Periphery(dac_bits=6, adc_bits=10, adc_bound=3.0), W, seed=0)
    x = torch.rand(10, 50, generator=torch.Generator().manual_seed(9), dtype=F64)
    y0 = t.mvm(x).clone()
    torch.testing.assert_close(t.mvm(x), y0)  # the held codes give the same read
    x.mul_(0.5)
    fresh = Tile(IdealDevice(), Periphery(dac_bits=6, adc_bits=10, adc_bound=3.0), W, seed=0)
    torch.testing.assert_close(t.mvm(x), fresh.mvm(x.clone()))
    assert not torch.allclose(t.mvm(x), y0)


def test_a_measured_table_card_ships_and_loads(tmp_path):
    from importlib import resources

    assert (resources.files("mep_hw.cards") / "agsi_jo2010.csv").is_file()  # package data of the wheel
    card = load_card("reram_agsi_measured")
    t = card.device.table
    assert t.curves == 1 and len(t.up[0]) == 98 and len(t.down[0]) == 102  # 97 and 101 pulses measured
    assert all(b > a for a, b in zip(t.up[0], t.up[0][1:])) and all(b < a for a, b in zip(t.down[0], t.down[0][1:]))
    assert "Jo" in t.source and card.to_dict()["device"]["table_file"] == "agsi_jo2010.csv"
    # a card of one's own with two measured devices: cells draw one curve each
    csv = "# test\ncurve,direction,pulse,g_uS\n" + "".join(
        f"{c},up,{k},{1 + c + k * (1 + c)}\n{c},down,{k},{1 + c + (10 - k) * (1 + c)}\n" for c in (0, 1) for k in range(11))
    (tmp_path / "two.csv").write_text(csv)
    (tmp_path / "two.toml").write_text('name = "two"\nkind = "crossbar"\nsource = "test"\n[device]\nresponse = "table"\n'
                                       'table_file = "two.csv"\ng_min_uS = 1.0\ng_max_uS = 21.0\n'
                                       '[sources]\nresponse = "t"\ntable_file = "t"\ng_min_uS = "t"\ng_max_uS = "t"\n')
    two = load_card(str(tmp_path / "two.toml"))
    st = two.device.init_state((1000,), torch.Generator().manual_seed(0), F64, "cpu")
    assert set(st.curve_p.unique().tolist()) == {0, 1}
    (tmp_path / "bad.csv").write_text("curve,direction,pulse,g_uS\n0,up,0,1\n0,up,1,2\n")
    (tmp_path / "bad.toml").write_text((tmp_path / "two.toml").read_text().replace("two.csv", "bad.csv"))
    with pytest.raises(ConfigError, match="curve 0 has no 'down' ramp"):
        load_card(str(tmp_path / "bad.toml"))


def test_a_tile_draws_its_random_numbers_on_its_own_device():
    """The tile's generator lives on the device of the weights it holds (no host draw and copy on
    an accelerator); on the CPU the stream is the one a CPU generator of the same seed gives."""
    card = load_card("pcm", {"levels": 16})
    W = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)) * 0.1
    t = Tile(card.device, card.periphery, W, seed=7)
    assert t.gen.device == W.device
    ref = torch.Generator().manual_seed(7)
    t2 = Tile(card.device, card.periphery, W, seed=7)
    x = torch.rand(4, 5, generator=ref)
    torch.testing.assert_close(t.mvm(x), t2.mvm(x))  # same seed, same reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_tile_reads_and_writes_on_cuda():
    card = load_card("pcm", {"levels": 16})
    W = (torch.randn(8, 5) * 0.1).cuda()
    t = Tile(card.device, card.periphery, W, seed=7)
    assert t.gen.device.type == "cuda"
    y = t.mvm(torch.rand(4, 5, device="cuda"))
    assert y.device.type == "cuda"
    t.write(torch.full_like(W, 0.01))
    assert all(v.device.type == "cuda" for v in t.state if isinstance(v, torch.Tensor))


def test_a_few_cells_at_a_bound_do_not_remap_a_tile():
    """Remapping looks at the 0.999-quantile of |w̃|, not the largest: 5 of 10 000 cells pushed to
    their bound (as cycle-to-cycle noise does on ReRAM) leave the scale alone, while with the
    quantile at 1 (the largest decides) they remap it; 100 cells (1 %) at the bound remap it with
    w_scale = w_headroom × the quantile."""
    import dataclasses

    card = load_card("ecram")
    W = torch.randn(100, 100, generator=torch.Generator().manual_seed(3), dtype=F64) * 0.1
    for cells, quantile, remapped in ((5, 0.999, False), (5, 1.0, True), (100, 0.999, True)):
        per = dataclasses.replace(card.periphery, w_remap=0.95, w_remap_quantile=quantile)
        t = Tile(card.device, per, W, seed=5, noise=NoiseBank(6))
        first_scale = t.w_scale
        push = torch.zeros_like(W)
        push.view(-1)[:cells] = first_scale  # a full range per write: two writes take the cells to their bound
        for _ in range(2):
            t.write(push)
        assert (t.remaps > 0) == remapped, (cells, quantile)
        if remapped:  # once, at w_headroom × the cells' value at their bound (≈ the first range)
            assert t.remaps == 1 and t.w_scale == pytest.approx(per.w_headroom * first_scale, rel=0.1)
        else:
            assert t.w_scale == first_scale


def test_a_saturating_tile_is_remapped_with_a_larger_scale():
    """With w_remap = 0.95, writes that push weights to the edge of the mapped range re-program
    the tile at w_scale = w_headroom × max|w| (the 0.999-quantile is the largest of 384 cells): the weights keep growing past the first range
    (without remapping they stop at it), the remap is counted, and the achieved change a write
    returns includes the re-programming. Devices with a fixed scale are never remapped."""
    import dataclasses

    card = load_card("ecram")
    W = torch.randn(16, 24, generator=torch.Generator().manual_seed(3), dtype=F64) * 0.1
    push = torch.zeros_like(W)
    push[0, 0] = 0.05  # one weight pushed up, well past the first range (2 × max|W|)
    tops, tiles = {}, {}
    for remap in (0.0, 0.95):
        per = dataclasses.replace(card.periphery, w_remap=remap)
        t = Tile(card.device, per, W, seed=5, noise=NoiseBank(6))
        first_scale = t.w_scale
        for _ in range(40):
            before = t.held().clone()
            achieved = t.write(push)
            torch.testing.assert_close(achieved, t.held() - before)
        tops[remap], tiles[remap] = float(t.held()[0, 0]), t
        assert (t.remaps > 0) == (remap > 0)
        assert (t.w_scale > first_scale) == (remap > 0)
    assert tops[0.0] <= tiles[0.0].w_scale * 1.1  # stuck at the first range (+ the devices' g_max spread)
    assert tops[0.95] > 1.5 * tiles[0.0].w_scale  # kept growing
    assert tiles[0.95].state_dict()["remaps"] == tiles[0.95].remaps
    fx = load_card("fpga_q16")
    t = Tile(fx.device, dataclasses.replace(fx.periphery, w_remap=0.95), W, seed=5)
    t.write(torch.full_like(W, 5.0))
    assert t.remaps == 0 and t.w_scale == 1.0
    with pytest.raises(ConfigError, match="w_remap"):
        Periphery(w_remap=1.5)
    with pytest.raises(ConfigError, match="w_remap_quantile"):
        Periphery(w_remap_quantile=0.2)
    with pytest.raises(ConfigError, match="w_remap"):
        Periphery(w_remap=0.4, w_headroom=2.0)

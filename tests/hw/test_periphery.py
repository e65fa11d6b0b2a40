"""Periphery: aihwkit-style noise management and iterative bound management (opt-in); the
default read is unchanged."""

import math

import pytest
import torch

from mep_hw.errors import ConfigError
from mep_hw.hw import CrossbarDevice, IdealDevice, NoiseBank, Periphery, Tile

F64 = torch.float64


def tile(periphery, seed=0, dev=None, W=None):
    W = W if W is not None else torch.randn(16, 64, generator=torch.Generator().manual_seed(1), dtype=F64) * 0.2
    return Tile(dev or IdealDevice(), periphery, W, seed=seed, noise=NoiseBank(3, dtype=F64))


def rel_err(t, x):
    y = t.mvm(x)
    exact = x @ t.held().T
    return float((y - exact).std() / exact.std())


def test_abs_max_noise_management_makes_the_relative_error_independent_of_the_input_scale():
    """Output noise 0.06 on ỹ = x̃ w̃ᵀ: without management the relative error of 1/16-scale inputs
    is 16× that of full-scale ones; scaling each vector by max|x̃| removes the dependence."""
    n = 4000
    x = torch.rand(n, 64, generator=torch.Generator().manual_seed(2), dtype=F64)
    plain = Periphery(out_noise=0.06)
    managed = Periphery(out_noise=0.06, noise_management="abs_max")
    r_big, r_small = rel_err(tile(plain), x), rel_err(tile(plain), x / 16)
    assert r_small / r_big == pytest.approx(16, rel=0.05)
    m_big, m_small = rel_err(tile(managed), x), rel_err(tile(managed), x / 16)
    assert m_small / m_big == pytest.approx(1.0, rel=0.05)
    assert m_small < r_small / 10


def test_iterative_bound_management_reads_again_with_halved_inputs():
    W = torch.full((4, 64), 0.5, dtype=F64)
    x = torch.ones(8, 64, dtype=F64)  # ỹ = 64 · 0.5 / (2 · 0.5) = 32 ≫ the ADC bound 12
    clip = tile(Periphery(adc_bits=12, adc_bound=12.0), W=W)
    bm = tile(Periphery(adc_bits=12, adc_bound=12.0, bound_management="iterative"), W=W)
    exact = x @ clip.held().T
    assert float(clip.mvm(x).max()) == pytest.approx(12.0 * clip.w_scale)  # clipped at the bound
    y = bm.mvm(x)
    torch.testing.assert_close(y, exact, atol=4 * 2 * 12 / 4094 * bm.w_scale, rtol=0)  # 4 ADC steps after ×4
    # the extra passes are counted: 1 + 1 + 1 reads (32 → 16 → 8 < 12)
    c = bm.op_counts()
    assert c.macs == 3 * 8 * 64 * 4 and c.adc == 3 * 8 * 4


def test_the_default_periphery_is_unchanged_and_management_is_validated():
    p = Periphery()
    assert (p.noise_management, p.bound_management, p.max_bm_factor, p.max_bm_res) == ("none", "none", 1000, 0.25)
    dev = CrossbarDevice(read_noise=0.01)
    a, b = tile(Periphery(dac_bits=7, adc_bits=9, out_noise=0.06), dev=dev), tile(Periphery(dac_bits=7, adc_bits=9, out_noise=0.06), dev=dev)
    x = torch.rand(5, 64, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert torch.equal(a.mvm(x), b.mvm(x)) and not a._managed
    with pytest.raises(ConfigError, match="noise_management='max' is not valid; choose one of: none, abs_max"):
        Periphery(noise_management="max")
    with pytest.raises(ConfigError, match="max_bm_factor=0 must be an integer"):
        Periphery(max_bm_factor=0)
    assert math.isfinite(Periphery(noise_management="abs_max", nm_thres=2.0).nm_thres)

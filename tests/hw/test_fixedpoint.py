"""Fixed-point datapath: golden vectors, rounding and overflow modes, bit-exact integer MVM."""

import numpy as np
import pytest
import torch

from mep_hw.errors import ConfigError
from mep_hw.hw import FixedPointDevice, Periphery, Tile
from mep_hw.hw.fixedpoint import to_fixed

F64 = torch.float64


def test_golden_vector():
    # Q4.4 everything (8-bit words, 4 fractional bits), 16-bit accumulator:
    # x = [1.5, -0.25] → [24, -4]; W = [[0.5, 1.0], [-2.0, 0.75]] → [[8, 16], [-32, 12]]
    # acc = [24·8 − 4·16, 24·(−32) − 4·12] = [128, −816]; y = acc / 2⁴ = [8, −51] → [0.5, −3.1875]
    dev = FixedPointDevice(weight_bits=8, weight_frac=4, act_bits=8, act_frac=4, acc_bits=16)
    W = torch.tensor([[0.5, 1.0], [-2.0, 0.75]], dtype=F64)
    st = dev.program(None, W, None)
    assert st.w.tolist() == [[8.0, 16.0], [-32.0, 12.0]]
    y = dev.device_mvm(st, torch.tensor([[1.5, -0.25]], dtype=F64), transpose=False)
    assert y.tolist() == [[0.5, -3.1875]]
    # the transpose read: u = [1, 1] → [8 − 32, 16 + 12] · 2⁻⁴ after the product shift
    yt = dev.device_mvm(st, torch.tensor([[1.0, 1.0]], dtype=F64), transpose=True)
    assert yt.tolist() == [[-1.5, 1.75]]


def test_rounding_modes():
    v = torch.tensor([2.5, 3.5, -2.5, -1.25, 0.75], dtype=F64)  # in LSB units (frac = 0)
    assert to_fixed(v, 8, 0, "nearest_even", "saturate").tolist() == [2.0, 4.0, -2.0, -1.0, 1.0]
    assert to_fixed(v, 8, 0, "truncate", "saturate").tolist() == [2.0, 3.0, -3.0, -2.0, 0.0]
    g = torch.Generator().manual_seed(0)
    s = to_fixed(torch.full((200_000,), 0.3, dtype=F64), 8, 0, "stochastic", "saturate", g)
    assert set(s.unique().tolist()) == {0.0, 1.0} and abs(float(s.mean()) - 0.3) < 0.005  # unbiased


def test_overflow_modes():
    v = torch.tensor([127.0, 128.0, 200.0, -129.0, -300.0], dtype=F64)
    assert to_fixed(v, 8, 0, "nearest_even", "saturate").tolist() == [127, 127, 127, -128, -128]
    assert to_fixed(v, 8, 0, "nearest_even", "wrap").tolist() == [127, -128, -56, 127, -44]


def test_accumulator_overflow():
    # 8-bit words, 10-bit accumulator: 4 products of 127·127 = 16129 overflow the accumulator
    for mode, expect in (("saturate", 511), ("wrap", (4 * 16129 + 512) % 1024 - 512)):
        dev = FixedPointDevice(weight_bits=8, weight_frac=0, act_bits=8, act_frac=0, acc_bits=10, overflow=mode)
        st = dev.program(None, torch.full((1, 4), 127.0, dtype=F64), None)
        acc_out = dev.integer_mvm(st.w, torch.full((1, 4), 127.0, dtype=F64), False)
        assert float(acc_out) == float(max(-128, min(127, expect)) if mode == "saturate" else ((expect + 128) % 256 - 128))


def reference_datapath(w_int, x_int, wf, ab, acc_bits):
    """The spec in plain int64 arithmetic: exact sum, end-of-sum saturation, round half even of
    the shift by wf, saturation to ab bits."""
    acc = x_int.astype(np.int64) @ w_int.astype(np.int64).T
    acc = np.clip(acc, -(2 ** (acc_bits - 1)), 2 ** (acc_bits - 1) - 1)
    q, r = np.divmod(acc, 2**wf)  # floor division
    half = 2 ** (wf - 1)
    up = (r > half) | ((r == half) & (q % 2 == 1))
    y = q + up
    return np.clip(y, -(2 ** (ab - 1)), 2 ** (ab - 1) - 1)


def test_bit_exact_against_int64_arithmetic():
    rng = np.random.default_rng(0)
    dev = FixedPointDevice(weight_bits=16, weight_frac=14, act_bits=16, act_frac=12, acc_bits=40)
    for _ in range(5):
        w_int = rng.integers(-(2**15), 2**15, (13, 300))
        x_int = rng.integers(-(2**15), 2**15, (9, 300))
        ours = dev.integer_mvm(torch.tensor(w_int, dtype=F64), torch.tensor(x_int, dtype=F64), False)
        ref = reference_datapath(w_int, x_int, 14, 16, 40)
        assert np.array_equal(ours.numpy().astype(np.int64), ref)


def test_tile_with_a_fixed_point_device_and_updates():
    dev = FixedPointDevice(weight_bits=12, weight_frac=8, act_bits=12, act_frac=8, rounding="stochastic")
    W = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = Tile(dev, Periphery(), W, seed=0)
    assert t.w_scale == 1.0
    assert float((t.held() - W).abs().max()) <= 2**-8
    # many updates far smaller than one LSB: stochastic rounding keeps their mean
    before = t.held().clone()
    for _ in range(400):
        t.write(torch.full_like(W, 0.1 * 2**-8))
    drift = float((t.held() - before).mean())
    assert abs(drift - 40 * 2**-8) < 6 * 2**-8
    assert t.op_counts().pulses_up > 0


def test_bad_fields():
    with pytest.raises(ConfigError, match=r"weight_frac=16 is out of range: expected an integer in \[0, 15\]"):
        FixedPointDevice(weight_bits=16, weight_frac=16)
    with pytest.raises(ConfigError, match=r"acc_bits=60 is out of range"):
        FixedPointDevice(acc_bits=60)
    with pytest.raises(ConfigError, match="rounding='ceil' is not valid"):
        FixedPointDevice(rounding="ceil")

"""The noise bank: how often two reads share values, against its formula."""

import torch

from mep_hw.hw import NoiseBank


def test_two_reads_share_values_with_probability_2n_minus_1_over_size():
    bank = NoiseBank(5, size=1 << 16, dtype=torch.float64)
    n, pairs = 1500, 6000
    p = bank.overlap_probability(n)
    assert p == (2 * n - 1) / (1 << 16)  # 4.6 %
    hits = same_place = 0
    for _ in range(pairs):
        a, b = bank.normal((n,)), bank.normal((n,))
        shared = set(a.tolist()) & set(b.tolist())
        hits += bool(shared)
        same_place += bool((a == b).any())
    assert abs(hits / pairs - p) < 5 * (p * (1 - p) / pairs) ** 0.5
    assert same_place <= 3  # the same value on the same output needs the same offset: 1/size per pair
    assert bank.overlap_probability(1 << 16) == 1.0

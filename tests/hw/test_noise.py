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


def test_a_read_larger_than_the_bank_is_fresh_iid_and_reproducible():
    """A read of more values than the bank holds (a convolution read at every output position)
    is drawn fresh: N(0, 1), distinct values, the same after restoring the offset stream."""
    import torch

    from mep_hw.hw.noise import NoiseBank

    bank = NoiseBank(seed=3, size=1000)
    state = bank.get_state()
    a = bank.normal((200, 300))  # 60 000 values > 1000
    assert a.shape == (200, 300) and a.unique().numel() > 59_000  # not the bank's 1000 values (float32 ties aside)
    assert abs(float(a.mean())) < 0.02 and abs(float(a.std()) - 1.0) < 0.02
    b = bank.normal((200, 300))
    assert not torch.equal(a, b)  # the next read is a new draw
    bank.set_state(state)
    assert torch.equal(bank.normal((200, 300)), a)  # resumable
    small = bank.normal((10, 20))  # a read within the bank still comes from it
    assert bool(torch.isin(small, bank.bank).all())

"""A bank of Gaussian noise, drawn once from the run's generator.

Drawing normal variates costs 4–7 ns per value on the CPUs this toolkit is measured on (more
than a whole settle step for one read of a 784×500 array). A device read instead takes a slice of
a bank of ``size`` (2^21) iid N(0, 1) values at a uniformly random offset. The values inside one
read are distinct draws. Two reads of n values each draw from overlapping windows — part of one
read is a shifted copy of part of the other — with probability (2n − 1)/size
(:meth:`NoiseBank.overlap_probability`: 4.8 % for the n = 50 000 values of a 784→500 read at batch
100); within a shared block, output j of one read carries the noise of output j + δ of the other,
so each output's noise is still independent between reads unless the offsets coincide
(probability 1/size), but sums over outputs of the two reads are correlated in those 4.8 % of read
pairs. A larger bank lowers both (memory: 2·size values). A read of more values than the bank
holds (a convolution read at every output position of a batch: 2.56·10⁶ values for
``conv:8:5`` on 28×28 images at batch 100) is drawn fresh instead, from a generator seeded by the
offset stream (iid, at the cost of drawing). Reproducible: the bank, the offsets and those seeds
come from the seed.
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor

__all__ = ["NoiseBank"]


class NoiseBank:
    def __init__(self, seed: int, size: int = 1 << 21, dtype=torch.float32, device="cpu"):
        g = torch.Generator().manual_seed(int(seed))
        self.size = int(size)
        # twice the size so that any slice of up to `size` values is contiguous
        bank = torch.randn(self.size, generator=g, dtype=torch.float64).to(dtype)
        self.bank = torch.cat([bank, bank]).to(device)
        self._rng = random.Random(int(seed) + 1)  # offsets: a Python RNG costs ~0.3 µs a draw

    def normal(self, shape) -> Tensor:
        """A view of N(0, 1) values of the given shape (read only: do not modify in place)."""
        n = math.prod(shape)
        if n > self.size:  # larger than the bank: fresh iid draws, seeded from the offset stream
            g = torch.Generator(device=self.bank.device).manual_seed(self._rng.getrandbits(63))
            return torch.randn(tuple(shape), generator=g, dtype=self.bank.dtype, device=self.bank.device)
        off = self._rng.randrange(self.size)
        if len(shape) == 2:  # one strided view, no slice + view
            return self.bank.as_strided(tuple(shape), (shape[1], 1), off)
        return self.bank[off : off + n].view(*shape)

    def overlap_probability(self, n: int) -> float:
        """Probability that two reads of n values share any bank value (their windows overlap)."""
        return min(1.0, (2 * int(n) - 1) / self.size)

    def get_state(self):
        return self._rng.getstate()

    def set_state(self, state) -> None:
        self._rng.setstate(state)

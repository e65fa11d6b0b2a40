"""A bank of Gaussian noise, drawn once from the run's generator.

Drawing normal variates costs 4–7 ns per value on the CPUs this toolkit is measured on (more
than a whole settle step for one read of a 784×500 array). A device read instead takes a slice of
a bank of 2^21 iid N(0, 1) values at a uniformly random offset: the values inside one read are
distinct draws, and a cell's noise in two reads is independent unless both reads drew the same
offset (probability 2^-21 per pair of reads). Reproducible: the bank and the offsets come from
the seed.
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
        if n > self.size:
            raise ValueError(f"a read of {n} values exceeds the noise bank of {self.size}")
        off = self._rng.randrange(self.size)
        if len(shape) == 2:  # one strided view, no slice + view
            return self.bank.as_strided(tuple(shape), (shape[1], 1), off)
        return self.bank[off : off + n].view(*shape)

    def get_state(self):
        return self._rng.getstate()

    def set_state(self, state) -> None:
        self._rng.setstate(state)

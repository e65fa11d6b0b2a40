"""The weight store: the one place a network's weight matrices live, are read and are written.

A network reads its weight matrices only through the store's operators (``store.ops[k]``, each
with ``mvm(x, add) = add + x Wᵀ`` and ``mvm_t(u, add) = add + u W``: on a crossbar the transpose
is read from the same cells) and writes them only through :meth:`WeightStore.apply`, which
returns the change the store actually achieved. Two kinds:

* :class:`IdealStore`: exact float weights (the model's own parameter tensors): reads are exact
  matrix products, writes are exact additions;
* :class:`TileStore`: each matrix held by a device :class:`~mep_hw.hw.base.Tile` of a card:
  reads go through DAC, device (read noise) and ADC; writes are pulses (quantised, asymmetric,
  noisy, saturating), so achieved ≠ intended. The parameter tensor a host optimizer sees is the
  noise-free weight the device holds (``held``): the store sets it after every write, it is never
  written any other way.

Operation counts (MACs, conversions, pulses) are an :class:`OpCounts` per matrix; a store has its
own ``state_dict`` (device states, generators, counts), so a run resumes exactly.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from mep_hw.errors import ConfigError, DeviceError
from mep_hw.hw.noise import NoiseBank

__all__ = ["OpCounts", "ExactOp", "BiasColumnOp", "WeightStore", "IdealStore", "TileStore", "build_store"]


class OpCounts(NamedTuple):
    """Operations of one weight matrix (or a sum of them): reads and writes."""

    macs: int = 0  # multiply-accumulates of the array's reads
    dac: int = 0  # input conversions
    adc: int = 0  # output conversions
    pulses_up: int = 0  # potentiating pulses (all cells)
    pulses_down: int = 0  # depressing pulses
    refreshes: int = 0  # cells re-programmed because a device saturated
    programmed: int = 0  # cells written by a program operation
    read_J: float = 0.0  # read energy from the held conductances (devices that model it), J
    write_J: float = 0.0  # pulse energy from the device's write physics (devices that model it), J
    static_W: float = 0.0  # holding power of the arrays now, W (a level, not a count: a difference is meaningless)

    def __add__(self, other: "OpCounts") -> "OpCounts":  # type: ignore[override]
        return OpCounts(*(a + b for a, b in zip(self, other)))

    def __sub__(self, other: "OpCounts") -> "OpCounts":
        return OpCounts(*(a - b for a, b in zip(self, other)))

    @property
    def pulses(self) -> int:
        return self.pulses_up + self.pulses_down


# at most this many outputs, an exact CPU read is computed as (W·xᵀ)ᵀ (see ExactOp.mvm)
SKINNY_OUT = 32


class ExactOp:
    """An exact weight matrix as a read operator (``W`` is read live: in-place changes show)."""

    exact = True
    digital = False

    def __init__(self, W: Tensor):
        self.W = W

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W.shape)

    def mvm(self, x: Tensor, add: Tensor | None = None, *, x_in_bound: bool = False) -> Tensor:
        Wt = self.W.T
        if x.is_complex() and not Wt.is_complex():  # holomorphic EP: a complex input is two real reads
            Wt = Wt.to(x.dtype)
        if add is not None and add.dtype != x.dtype:
            return (x @ Wt).add_(add) if x.is_complex() else (x @ Wt) + add
        if x.device.type == "cpu" and self.W.shape[0] <= SKINNY_OUT and x.ndim == 2 and x.shape[0] > self.W.shape[0]:
            # few outputs (a readout): MKL's x·Wᵀ with a narrow result runs at a fraction of its
            # speed; (W·xᵀ)ᵀ is the same product, 1.7–2.7× faster for 10 outputs at batch 100–1000
            # (measured, one thread; docs/training.md) and equal up to float32 summation order
            y = (self.W @ x.T).T
            return y if add is None else y + add
        return x @ Wt if add is None else torch.addmm(add, x, Wt)

    def mvm_t(self, u: Tensor, add: Tensor | None = None, *, x_in_bound: bool = False) -> Tensor:
        W = self.W.to(u.dtype) if u.is_complex() and not self.W.is_complex() else self.W
        if add is not None and add.dtype != u.dtype:
            return (u @ W).add_(add) if u.is_complex() else (u @ W) + add
        return u @ W if add is None else torch.addmm(add, u, W)


class WeightStore(ABC):
    """The weight matrices of one network (see the module docstring)."""

    card = None  # the device card (None: exact float weights)
    holds_biases = False  # the biases live in the store (analog biases) rather than on the host

    def __init__(self, params: Sequence[Tensor]):
        self.params = list(params)
        self._index = {id(p): k for k, p in enumerate(self.params)}

    def __len__(self) -> int:
        return len(self.params)

    @property
    @abstractmethod
    def ops(self) -> tuple: ...

    @abstractmethod
    def held(self, k: int) -> Tensor:
        """The logical weights matrix ``k`` holds now, noise-free."""

    @abstractmethod
    def apply(self, k: int, delta: Tensor) -> Tensor:
        """Write an intended change of matrix ``k``; returns the change achieved."""

    @property
    def exact(self) -> bool:
        """Reads are exact matrix products and writes exact additions."""
        return False

    def index(self, p: Tensor) -> int | None:
        """Which matrix the parameter tensor ``p`` is (None: not held by the store)."""
        return self._index.get(id(p))

    @torch.no_grad()
    def writer(self, p: Tensor, delta: Tensor) -> Tensor:
        """The host optimizer's write path (``writer(param, delta) -> applied``): a matrix of the
        store is written through :meth:`apply`; anything else (biases, on the digital host) exactly."""
        k = self.index(p)
        if k is None:
            p.add_(delta)
            return delta
        return self.apply(k, delta)

    def counts(self, k: int | None = None) -> OpCounts:
        """Operation counts of matrix ``k``, or summed over all."""
        return OpCounts()

    def weight_bound(self, p: Tensor) -> float | None:
        """The largest |w| the store can hold for the parameter ``p`` (None: unbounded, or not
        held by the store). Error feedback clips its residual's target to it."""
        return None

    def layer_info(self) -> list[dict]:
        """Per matrix: name, shape, mapping scale and counts (for metrics.json)."""
        return [{"layer": f"W{k}", "shape": list(p.shape), "w_scale": 1.0, **self.counts(k)._asdict()} for k, p in enumerate(self.params)]

    def noise_rms(self, k: int, x_rms: float, transpose: bool = False) -> float:
        """rms of the noise of one output of a read of matrix ``k`` (logical units) for inputs of
        rms ``x_rms`` (forward read, or the transpose read)."""
        return 0.0

    def physical(self, k: int) -> dict[str, tuple[Tensor, str]]:
        """Physical quantities of matrix ``k`` with their units (for traces)."""
        return {}

    def advance(self, seconds: float) -> None:
        """Let device time pass (drift)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass


class IdealStore(WeightStore):
    """Exact float weights: the parameter tensors themselves."""

    @property
    def ops(self) -> tuple:
        # detached views made on each access: reads carry no autograd graph, and a parameter
        # whose data was replaced (``module.to``) is read as it is now
        return tuple(ExactOp(p.detach()) for p in self.params)

    @property
    def exact(self) -> bool:
        return True

    def held(self, k: int) -> Tensor:
        return self.params[k].detach()

    @torch.no_grad()
    def apply(self, k: int, delta: Tensor) -> Tensor:
        self.params[k].add_(delta)
        return delta


class BiasColumnOp:
    """A tile whose last column holds the layer's bias, driven by a constant input 1 (an analog
    bias, as aihwkit's ``analog_bias``): every forward read reads the bias cells with the others
    (their read noise and the one ADC conversion included); the transpose read leaves the bias
    column out."""

    exact = False
    digital = False

    def __init__(self, tile):
        self.tile = tile
        self._ones: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        out, n = self.tile.shape
        return (out, n - 1)

    def _augment(self, x: Tensor) -> Tensor:
        ones = self._ones
        if ones is None or ones.shape[0] < x.shape[0] or ones.dtype != x.dtype or ones.device != x.device:
            ones = self._ones = torch.ones(max(x.shape[0], 1), 1, dtype=x.dtype, device=x.device)
        return torch.cat([x, ones[: x.shape[0]]], dim=1)

    def mvm(self, x: Tensor, add: Tensor | None = None, *, x_in_bound: bool = False) -> Tensor:
        return self.tile.mvm(self._augment(x), add, x_in_bound=x_in_bound)

    def mvm_t(self, u: Tensor, add: Tensor | None = None, *, x_in_bound: bool = False) -> Tensor:
        y = self.tile.mvm_t(u, x_in_bound=x_in_bound)[:, :-1]
        return y if add is None else add + y


class TileStore(WeightStore):
    """Each weight matrix held by a device tile of ``card`` (see the module docstring).

    ``params`` are the parameter tensors the host optimizer holds; their present values are
    programmed into the tiles, and from then on each is the tile's noise-free weight, set by the
    store after every write. With ``biases`` (one vector per matrix) each tile holds its layer's
    bias in an extra column driven by a constant input 1 (:class:`BiasColumnOp`); otherwise the
    biases stay on the digital host. Tile ``k`` is seeded ``seed·1000 + k + 1``; read noise comes
    from one :class:`~mep_hw.hw.noise.NoiseBank` seeded from ``seed``.
    """

    def __init__(self, card, params: Sequence[Tensor], seed: int, names: Sequence[str] | None = None,
                 biases: Sequence[Tensor] | None = None):
        from mep_hw.hw.base import Tile

        super().__init__(params)
        if not self.params:
            raise ConfigError("a tile store needs at least one weight matrix")
        self.biases = list(biases) if biases is not None else None
        if self.biases is not None and [b.shape[0] for b in self.biases] != [p.shape[0] for p in self.params]:
            raise ConfigError("analog biases: give one bias vector per weight matrix, of its output size")
        self._bias_index = {id(b): k for k, b in enumerate(self.biases or ())}
        self.card = card
        p0 = self.params[0]
        self.noise = NoiseBank(seed * 7919 + 17, dtype=p0.dtype, device=p0.device)
        names = list(names) if names is not None else [f"W{k}" for k in range(len(self.params))]

        def matrix(k, p):
            W = p.detach().reshape(p.shape[0], -1)
            return W if self.biases is None else torch.cat([W, self.biases[k].detach().reshape(-1, 1)], dim=1)

        self.tiles = tuple(
            Tile(card.device, card.periphery, matrix(k, p), seed=seed * 1000 + k + 1, noise=self.noise, name=names[k])
            for k, p in enumerate(self.params)
        )
        self._ops = tuple(BiasColumnOp(t) for t in self.tiles) if self.biases is not None else self.tiles
        self.t_step_s = float(getattr(card.device, "t_step_s", 0.0))
        self._sync()

    @property
    def ops(self) -> tuple:
        return self._ops

    @property
    def holds_biases(self) -> bool:
        return self.biases is not None

    @torch.no_grad()
    def _sync(self, k: int | None = None) -> None:
        """Parameter tensors ← what the tiles hold (views of the same tensor, no copy)."""
        for j in range(len(self.params)) if k is None else (k,):
            p, held = self.params[j], self.tiles[j].held()
            if self.biases is None:
                p.data = held.view(p.shape)
            else:
                p.data = held[:, :-1].view(p.shape) if p.ndim == 2 else held[:, :-1]
                self.biases[j].data = held[:, -1]

    def held(self, k: int) -> Tensor:
        h = self.tiles[k].held()
        return h if self.biases is None else h[:, :-1]

    def _full(self, k: int, delta: Tensor, bias: bool) -> Tensor:
        """A change of the weights (or of the bias column) as a change of the whole tile."""
        t = self.tiles[k]
        if self.biases is None:
            return delta.reshape(t.shape)
        full = delta.new_zeros(t.shape)
        if bias:
            full[:, -1] = delta
        else:
            full[:, :-1] = delta.reshape(t.shape[0], -1)
        return full

    def weight_bound(self, p: Tensor) -> float | None:
        k = self.index(p)
        return None if k is None else self.tiles[k].weight_bound

    @torch.no_grad()
    def apply(self, k: int, delta: Tensor) -> Tensor:
        achieved = self.tiles[k].write(self._full(k, delta, False), seconds=self.t_step_s)
        self._sync(k)
        return (achieved if self.biases is None else achieved[:, :-1]).reshape(self.params[k].shape)

    @torch.no_grad()
    def apply_bias(self, k: int, delta: Tensor) -> Tensor:
        """Write a change of the analog bias of layer ``k``; returns what was achieved."""
        achieved = self.tiles[k].write(self._full(k, delta, True), seconds=self.t_step_s)
        self._sync(k)
        return achieved[:, -1]

    @torch.no_grad()
    def writer(self, p: Tensor, delta: Tensor) -> Tensor:
        k = self._bias_index.get(id(p))
        if k is not None:
            return self.apply_bias(k, delta)
        return super().writer(p, delta)

    @torch.no_grad()
    def apply_pulses(self, k: int, n_up: Tensor, n_down: Tensor) -> None:
        """Apply pulse counts to every cell of tile ``k`` (with the bias column when the store
        holds biases): the in-array update (:mod:`mep_hw.hw.pulses`)."""
        self.tiles[k].apply_pulses(n_up, n_down, seconds=self.t_step_s)
        self._sync(k)

    def dw_pulse(self, k: int) -> float:
        """The change of a logical weight of matrix ``k`` per pulse at the symmetry point."""
        return self.tiles[k].dw_pulse

    def counts(self, k: int | None = None) -> OpCounts:
        if k is not None:
            return self.tiles[k].op_counts()
        total = OpCounts()
        for t in self.tiles:
            total = total + t.op_counts()
        return total

    def layer_info(self) -> list[dict]:
        return [{"layer": t.name, "shape": list(t.shape), "w_scale": t.w_scale, "remaps": t.remaps, **t.op_counts()._asdict()}
                for t in self.tiles]

    def noise_rms(self, k: int, x_rms: float, transpose: bool = False) -> float:
        t = self.tiles[k]
        return t.noise_rms_out(x_rms, t.shape[0] if transpose else t.shape[1])

    def physical(self, k: int) -> dict[str, tuple[Tensor, str]]:
        t = self.tiles[k]
        return t.device.physical(t.state)

    def advance(self, seconds: float) -> None:
        for t in self.tiles:
            t.advance(seconds)
        self._sync()

    def state_dict(self) -> dict:
        return {"tiles": [t.state_dict() for t in self.tiles], "noise_rng": self.noise.get_state()}

    def load_state_dict(self, d: dict) -> None:
        if len(d["tiles"]) != len(self.tiles):
            raise DeviceError(f"the checkpoint holds {len(d['tiles'])} tiles but the network has {len(self.tiles)} weight matrices")
        for t, s in zip(self.tiles, d["tiles"]):
            t.load_state_dict(s)
        self.noise.set_state(d["noise_rng"])
        self._sync()


def build_store(card, params: Sequence[Tensor], seed: int, names: Sequence[str] | None = None,
                biases: Sequence[Tensor] | None = None) -> WeightStore:
    """An :class:`IdealStore` (``card`` None) or a :class:`TileStore` of ``card`` (with analog
    ``biases`` if given)."""
    if card is None:
        if biases is not None:
            raise ConfigError("analog biases live on device tiles: give a device card")
        return IdealStore(params)
    return TileStore(card, params, seed, names, biases)


def rms_noise_floor(terms: Sequence[tuple[float, int]]) -> float:
    """rms over state components of per-component noise: ``terms`` are (variance, count) pairs."""
    var = sum(v * n for v, n in terms)
    count = sum(n for _, n in terms)
    return math.sqrt(var / max(count, 1))

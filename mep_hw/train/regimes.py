"""Update regimes: how a learning signal becomes a change of the weights the store holds.

A trainer (EP or backprop) produces an :class:`Estimate` of one step: the host's gradient
(``grads``, for the host regime) and, for in-array regimes, the *phases* whose outer products
make the update, ΔW = lr · scale · Σ_phases sign · Σ_batch d aᵀ (for EP the two phases of the
contrast with scale 1/((β_a − β_b)·B), for backprop one phase d = −δ with scale 1/B).

* :class:`HostUpdate` (``--update host``, the default): the gradient goes into ``.grad``; the host
  optimizer (Adam, SGD, Muon, Dion) computes the intended change and writes it through the store's
  single write path; on a device store error feedback keeps intended − achieved (mixed-precision
  training, Nandakumar et al., Front. Neurosci. 2020), and the coupled spectral constraint is
  checked on what the store holds.
* :class:`AnalogUpdate` (``--update analog``): each phase's outer products are applied by the
  array itself, by stochastic pulse coincidence (:mod:`mep_hw.hw.pulses`): rows driven by a,
  columns by d, BL slots, C_x = C_d = √(η/(BL·Δw_min)) for activities in [0, 1] (EP), or
  aihwkit's update management for signed errors (backprop); the first phase potentiates, the
  second depresses, every coincidence a pulse with the card's full pulse physics. No host
  arithmetic: the biases are analog too (a column driven by 1). With ``pulse_phases = signed``
  the two phases of a matrix whose presynaptic activity they share (the clamped input x of the
  first layer) go as one signed train of d⁺ − d⁻ (Σ_b (d⁺ − d⁻) xᵀ, the same expectation, a
  fraction of the pulses and of their noise); each neuron forms its d⁺ − d⁻ in its own circuit,
  holding its state of the other phase (counted as neuron operations, not host FLOPs).
* :class:`TikiTakaUpdate` (``--update tiki-taka``): the same in-array update goes to a fast array
  A; a digital buffer H transfers it to the slow array C, which the network reads
  (:mod:`mep_hw.hw.transfer`).

Pulses of one batch are applied together, at the state the batch starts from (the device's
``apply_pulses`` takes each cell's up and down counts). The learning rate follows the schedule.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from mep_hw.errors import ConfigError, DeviceError
from mep_hw.host.flops import ep_estimate_flops, host_step_flops
from mep_hw.hw.pulses import coincidences, coincidences_marginal, update_management
from mep_hw.hw.transfer import TransferConfig, TransferState, transfer_step
from mep_hw.optimizers import host_optimizer

__all__ = ["Estimate", "HostUpdate", "AnalogUpdate", "TikiTakaUpdate", "build_regime"]


class Estimate(NamedTuple):
    grads: list[Tensor] | None  # the host estimate, in the order of model.param_list()
    phases: tuple = ()  # ((sign, [(d, a) per matrix]), …)
    scale: float = 1.0  # ΔW = lr · scale · Σ sign · Σ_batch d aᵀ
    signed: bool = False  # d or a may be negative (update management then balances them)


class _Schedule:
    """The learning rate of the run: cosine decay over ``steps_total`` or constant (the same
    schedule as torch's CosineAnnealingLR, stepped once per optimizer step)."""

    def __init__(self, lr: float, kind: str, steps_total: int):
        self.base, self.kind, self.total, self.t = lr, kind, max(1, steps_total), 0

    @property
    def lr(self) -> float:
        if self.kind != "cosine":
            return self.base
        return 0.5 * self.base * (1.0 + math.cos(math.pi * min(self.t, self.total) / self.total))

    def step(self) -> None:
        self.t += 1


class HostUpdate:
    """The host regime (see the module docstring)."""

    name = "host"

    def __init__(self, model, cfg, steps_total: int):
        store = model.store
        self.params = model.param_list()
        coupled = None
        if cfg.spectral_gamma is not None and model.n_states > 1:
            coupled = list(model.weights)[1 : model.n_states]
        self.optimizer = host_optimizer(
            cfg.optimizer, cfg.param_groups(model), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            writer=None if store.exact else store.writer, weight_bound=None if store.exact else store.weight_bound,
            error_feedback=not store.exact, coupled=coupled,
            coupled_gamma=cfg.spectral_gamma,
        )
        self.scheduler = None
        if cfg.schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, steps_total))
        self._shapes = [tuple(w.shape) for w in model.weights]
        self._positions = model.positions()
        self._step_flops = host_step_flops(cfg.optimizer, self._shapes, [b.numel() for b in model.biases])
        self._ep_estimate = cfg.method == "ep"  # backprop's trainer counts its own outer products

    needs_grads = True

    def apply(self, est: Estimate) -> None:
        from mep_hw.ep import assign_grads

        assign_grads(self.params, est.grads)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def host_flops(self, batch: int) -> int:
        """EP's estimate (outer products of both phases) and the optimizer step."""
        est = ep_estimate_flops(batch, self._shapes, self._positions) if self._ep_estimate else 0
        return est + self._step_flops

    def neuron_ops(self, batch: int) -> int:
        return 0

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, d: dict) -> None:
        self.optimizer.load_state_dict(d["optimizer"])
        if self.scheduler is not None and d.get("scheduler") is not None:
            self.scheduler.load_state_dict(d["scheduler"])


def _check_in_array(store, name: str) -> None:
    if store.exact or not hasattr(store, "apply_pulses"):
        raise ConfigError(f"--update {name} applies the update in the array: give a device card with --device")
    if not store.holds_biases:
        raise ConfigError(f"--update {name}: the store must hold the biases in the arrays (build it with biases=)")
    for t in store.tiles:
        if getattr(t.device, "dw_pulse", None) is None:
            raise DeviceError(f"--update {name}: a {t.device.kind} device has no pulse model, so it cannot apply "
                              "updates in the array; use a crossbar or the ideal card, or --update host")


class AnalogUpdate:
    """The analog (in-array) regime (see the module docstring)."""

    name = "analog"
    needs_grads = False

    def __init__(self, model, cfg, steps_total: int, *, seed: int | None = None):
        self.store = model.store
        _check_in_array(self.store, self.name)
        self.bl = cfg.pulse_bl
        self.sampling = cfg.pulse_sampling
        self.schedule = _Schedule(cfg.lr, cfg.schedule, steps_total)
        self.signed_phases = cfg.pulse_phases == "signed"
        self._merge_ops = 0
        self.gen = torch.Generator(device=model.weights[0].device).manual_seed(
            (cfg.seed if seed is None else seed) * 2_147_483 + 977)
        self._warned = False

    def _targets(self) -> Sequence:
        """The tiles the update is written to (the fast arrays for tiki-taka)."""
        return self.store.tiles

    lr_gain = 1.0  # tiki-taka: the fast array's rate over the schedule's

    def _phases(self, est: Estimate, k: int) -> tuple[list, bool]:
        """Matrix k's trains: [(sign, d, a), …] and whether they are signed. With ``pulse_phases =
        signed``, two phases that share the presynaptic activity a (the clamped input: the same
        tensor in both phases' terms) become one signed train of s_1·d_1 + s_2·d_2 (Σ_b d aᵀ is
        linear in d: the same expectation)."""
        trains = [(sign, *terms[k]) for sign, terms in est.phases]
        if self.signed_phases and len(trains) == 2:
            (s1, d1, a1), (s2, d2, a2) = trains
            if a1 is a2:
                self._merge_ops += d1.numel()  # one subtraction per neuron and sample
                return [(1.0, s1 * d1 + s2 * d2, a1)], True
        return trains, est.signed

    def _pulse(self, est: Estimate) -> None:
        eta = self.schedule.lr * self.lr_gain * est.scale
        self._merge_ops = 0
        for k, tile in enumerate(self._targets()):
            n_up = n_down = None
            trains, signed = self._phases(est, k)
            for sign, d, a in trains:
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)  # the bias column's input: 1
                eta_w = eta / tile.w_scale  # in the tile's normalised units, like its pulse step
                dw = tile.dw_pulse / tile.w_scale
                if signed:
                    a_max, d_max = float(a.abs().max()), float(d.abs().max())
                    cx, cd = update_management(eta_w, self.bl, dw, a_max, d_max)
                    p_max = max(cx * a_max, cd * d_max)  # the largest pulse probability of the batch
                else:  # activities in [0, 1] and the bias column's input 1: the largest probability is C
                    cx = cd = math.sqrt(eta_w / (self.bl * dw))
                    p_max = cx
                if p_max > 1.0 and not self._warned:
                    warnings.warn(f"--update {self.name}: pulse probabilities clip at 1 (largest C·|x| = {p_max:.2f}): "
                                  f"the update is smaller than lr asks; raise --pulse-bl or lower --lr", stacklevel=2)
                    self._warned = True
                if self.sampling == "exact":
                    c = coincidences(a, d, bl=self.bl, cx=cx, cd=cd, generator=self.gen, signed=signed)
                else:
                    c = coincidences_marginal(a, d, bl=self.bl, cx=cx, cd=cd, generator=self.gen)
                up, down = (c.up, c.down) if sign > 0 else (c.down, c.up)
                n_up = up if n_up is None else n_up + up
                n_down = down if n_down is None else n_down + down
            self._apply(k, n_up, n_down)

    def _apply(self, k: int, n_up: Tensor, n_down: Tensor) -> None:
        self.store.apply_pulses(k, n_up, n_down)

    def apply(self, est: Estimate) -> None:
        self._pulse(est)
        self.schedule.step()

    def host_flops(self, batch: int) -> int:
        """Nothing: the update is applied by the array."""
        return 0

    def neuron_ops(self, batch: int) -> int:
        """With signed phases, the last step's subtractions ρ(s⁺) − ρ(s⁻), one per neuron and sample,
        each in the neuron's own circuit (it holds its state of the other phase); else nothing."""
        return self._merge_ops

    @property
    def lr(self) -> float:
        return self.schedule.lr

    def state_dict(self) -> dict:
        return {"t": self.schedule.t, "gen": self.gen.get_state()}

    def load_state_dict(self, d: dict) -> None:
        self.schedule.t = int(d["t"])
        self.gen.set_state(d["gen"])


class TikiTakaUpdate(AnalogUpdate):
    """Tiki-Taka v2 on the store's arrays (see the module docstring and :mod:`mep_hw.hw.transfer`):
    the store's tiles are the slow arrays C the network reads; this regime holds the fast
    arrays A (tiles of the same card, programmed to their symmetry point) and the buffers H."""

    name = "tiki-taka"

    def __init__(self, model, cfg, steps_total: int, *, seed: int | None = None):
        super().__init__(model, cfg, steps_total, seed=seed)
        from mep_hw.hw.base import Tile

        self.cfg = TransferConfig(every=cfg.transfer_every, columns=cfg.transfer_columns, lr=cfg.transfer_lr,
                                  gamma=cfg.tt_gamma, max_pulses=cfg.transfer_max_pulses, reset_fast=cfg.transfer_reset,
                                  momentum=cfg.transfer_momentum, forget=cfg.transfer_forget)
        self.lr_gain = cfg.transfer_fast_lr / cfg.lr  # TrainConfig resolves it for tiki-taka (FAST_LR_FACTOR × lr)
        self.transfer_scaled = cfg.transfer_scaled
        if self.cfg.gamma != 0.0:
            raise ConfigError("tt_gamma > 0 (reading W = C + γA) is not supported yet: the network reads C; use --tt-gamma 0")
        seed = cfg.seed if seed is None else seed
        self.fast = []
        self.sym = []
        for k, c in enumerate(self.store.tiles):
            a = Tile(c.device, c.periphery, c.held(), seed=seed * 1000 + 500 + k, noise=self.store.noise, name=f"A{k}")
            sym = a.device.symmetry_point(a.state) * a.w_scale  # logical units, per cell
            a.program(sym)
            self.fast.append(a)
            self.sym.append(sym)
        self.H = [torch.zeros(c.shape, dtype=c.held().dtype, device=c.held().device) for c in self.store.tiles]
        self.next_col = [0] * len(self.fast)
        self.steps = 0
        self._flops = 0

    def _targets(self) -> Sequence:
        return self.fast

    def _apply(self, k: int, n_up: Tensor, n_down: Tensor) -> None:
        self.fast[k].apply_pulses(n_up, n_down, seconds=self.store.t_step_s)

    def apply(self, est: Estimate) -> None:
        self._pulse(est)
        self.steps += 1
        self._flops = 0
        if self.steps % self.cfg.every == 0:
            cfg = self.cfg
            if self.transfer_scaled:  # aihwkit's scale_transfer_lr: the transfer rate follows the schedule
                cfg = cfg._replace(lr=cfg.lr * self.schedule.lr / self.schedule.base)
            for k, (a, c) in enumerate(zip(self.fast, self.store.tiles)):
                st, flops = transfer_step(a, c, TransferState(self.H[k], self.next_col[k]), cfg, self.sym[k])
                self.H[k], self.next_col[k] = st.H, st.next_col
                self._flops += flops
            self.store._sync()
        self.schedule.step()

    def host_flops(self, batch: int) -> int:
        """The transfer's buffer arithmetic of the last step (the update itself is in-array)."""
        return self._flops

    def trace_values(self) -> dict[str, tuple[Tensor, str]]:
        """Per weight matrix, the fast array A (logical weights as held, its physical state, its
        symmetry point) and the buffer H, for the trace (the slow array C is the store's)."""
        out = {}
        for k, a in enumerate(self.fast):
            out[f"layers/W{k}/fast/weight"] = (a.held(), "1")
            out[f"layers/W{k}/fast/symmetry_point"] = (self.sym[k], "1")
            for name, (v, units) in a.device.physical(a.state).items():
                out[f"layers/W{k}/fast/{name}"] = (v, units)
            out[f"layers/W{k}/buffer_H"] = (self.H[k], "pulses")
        return out

    def counts(self):
        from mep_hw.hw.store import OpCounts

        total = OpCounts()
        for a in self.fast:
            total = total + a.op_counts()
        return total

    def state_dict(self) -> dict:
        return {**super().state_dict(), "fast": [a.state_dict() for a in self.fast], "H": list(self.H),
                "next_col": list(self.next_col), "steps": self.steps}

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        for a, s in zip(self.fast, d["fast"]):
            a.load_state_dict(s)
        self.H = [h.clone() for h in d["H"]]
        self.next_col = [int(c) for c in d["next_col"]]
        self.steps = int(d["steps"])


REGIMES = {"host": HostUpdate, "analog": AnalogUpdate, "tiki-taka": TikiTakaUpdate}


def build_regime(model, cfg, steps_total: int):
    """The update regime ``cfg.update`` for ``model`` (whose store is already built)."""
    return REGIMES[cfg.update](model, cfg, steps_total)

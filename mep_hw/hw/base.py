"""The device abstraction, the ideal device, and a tile: one weight matrix held by a device.

A :class:`Device` is a frozen, keyword-only dataclass of physical parameters (units in the field
names) plus pure maps between normalised weights w̃ ∈ [−1, 1] and the physical state. The
per-cell state (conductances, per-cell variations sampled once, phases, integers) lives in a
NamedTuple the device creates from an explicit ``torch.Generator``. Verbs:

* ``program(state, w̃)``: write intended weights; the device decides what it holds;
* ``mean(state)``: the logical weights it holds now, without read noise (drift, IR drop…);
* ``read(state, noise)``: one noisy read;
* ``update(state, Δw̃)``: apply an intended change as the device would (pulses), returning the
  new state and the pulse counts;
* ``apply_pulses(state, n_up, n_down)``: apply given numbers of weight-up and weight-down pulses
  (the in-array regime; ``update`` is ``apply_pulses`` with n = round(|Δw̃| / ``dw_pulse``));
* ``symmetry_point(state)``: the w̃ at which an up and a down pulse have equal and opposite
  expected effect;
* ``physical(state)``: the physical quantities with their units, for traces.

A :class:`Tile` composes a device, a :class:`~mep_hw.hw.periphery.Periphery` and the mapping
scale W = w_scale · w̃, and offers ``mvm`` (x Wᵀ) and ``mvm_t`` (u W, the transpose read from the
same cells) with DAC, read noise, output noise and ADC applied.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from mep_hw.errors import ConfigError, DeviceError
from mep_hw.hw.noise import NoiseBank
from mep_hw.hw.periphery import Periphery, quantize

__all__ = ["Device", "IdealDevice", "IdealState", "UpdateCounts", "Tile"]


def check_range(name, v, lo=None, hi=None, lo_open=False, integer=False):
    """Raise ConfigError naming ``name`` unless ``v`` is a finite number (an integer if asked) in range."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if integer:
        ok = ok and isinstance(v, int)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v <= hi
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '−∞'}, {hi if hi is not None else '∞'}]"
        raise ConfigError(f"{name}={v!r} is out of range: expected {'an integer' if integer else 'a number'} in {rng}")


class UpdateCounts(NamedTuple):
    """What one write did. Counts are ints or 0-dim tensors (summed without a host sync)."""

    pulses_up: Any  # potentiating device pulses (all cells of the tile)
    pulses_down: Any  # depressing device pulses
    refreshes: Any  # pairs re-programmed because a device saturated
    programmed: Any  # cells written by a program operation
    write_J: Any = 0.0  # electrical energy of the pulses, where the device models it (J)


# input coding of an analog read: the energy of a line driven at normalised input x̃ is
# V_read² · G · t_read · f(x̃), f = x̃² for amplitude coding, |x̃| for pulse-width coding
INPUT_CODINGS = ("pulse_width", "amplitude")


class Device(ABC):
    """One kind of weight store (see the module docstring)."""

    kind: ClassVar[str] = "device"

    @abstractmethod
    def init_state(self, shape, generator: torch.Generator, dtype: torch.dtype, device) -> Any: ...

    @abstractmethod
    def program(self, state, w: Tensor, generator: torch.Generator) -> Any: ...

    @abstractmethod
    def mean(self, state) -> Tensor: ...

    def read_std(self, state) -> float | Tensor | None:
        """Per-cell standard deviation of one read, in normalised weight units (None: exact)."""
        return None

    def read(self, state, noise: NoiseBank | None) -> Tensor:
        m = self.mean(state)
        std = self.read_std(state)
        if std is None or noise is None:
            return m.clone()
        return m + noise.normal(m.shape) * std

    @abstractmethod
    def update(self, state, dw: Tensor, generator: torch.Generator) -> tuple[Any, UpdateCounts]: ...

    # ------------------------------------------------------------------ pulsed (in-array) updates
    @property
    def dw_pulse(self) -> float | None:
        """Nominal change of the normalised weight w̃ per pulse at the symmetry point (aihwkit's
        ``dw_min``), so a learning rate maps to pulses (η = BL·dw_min·C_x·C_d, Gokmen & Vlasov
        2016). None: the device has no pulse model."""
        return None

    def apply_pulses(self, state, n_up: Tensor, n_down: Tensor, generator: torch.Generator) -> tuple[Any, UpdateCounts]:
        """Apply ``n_up`` weight-up and ``n_down`` weight-down pulses per weight (non-negative
        integer-valued tensors of the weight shape). Devices without a pulse model raise."""
        raise DeviceError(f"a {self.kind} device has no pulse model: in-array updates need a pulsed device "
                          "(a crossbar or ideal card); use --update host, or write intended changes with update()")

    def symmetry_point(self, state) -> Tensor:
        """Per weight, the w̃ where an up and a down pulse have equal and opposite expected effect.
        A device whose steps do not depend on its state is symmetric everywhere: 0."""
        return torch.zeros_like(self.mean(state))

    @property
    def restores_to_symmetry_point(self) -> bool:
        """Whether the expected effect of a weight-up plus a weight-down pulse depends on the
        weight, so that zero-mean pulse trains pull it to its symmetry point (an asymmetric
        device's leak, on which Tiki-Taka's fast array relies). A device whose steps do not
        depend on its state has none."""
        return False

    # ------------------------------------------------------------------ energy
    input_coding: ClassVar[str] = "pulse_width"

    def read_energy_lines(self, state, transpose: bool) -> Tensor | None:
        """Energy (J) one input line draws in one read at full-scale input |x̃| = 1: V_read² · t_read
        · Σ (conductances on the line), per input line (columns of W; rows when ``transpose``).
        A read with inputs x̃ costs Σ_j f(x̃_j) · lines_j with f given by ``input_coding``. None:
        the device does not model its read energy (the card's per-MAC constant is used)."""
        return None

    def static_power_W(self, state) -> float:
        """Power the array draws to hold its state (W), e.g. thermo-optic phase shifters."""
        return 0.0

    @property
    def models_write_energy(self) -> bool:
        """True when ``UpdateCounts.write_J`` holds the pulses' energy (else the card's e_pulse_J)."""
        return False

    def advance(self, state, seconds: float) -> Any:
        """Let time pass (drift); by default nothing changes."""
        return state

    def physical(self, state) -> dict[str, tuple[Tensor, str]]:
        return {"weight": (self.mean(state), "1")}

    remappable: ClassVar[bool] = False  # w_scale is a free periphery scale (the tile may be re-programmed with another)

    @property
    def weight_limit(self) -> float | None:
        """The largest |w̃| the device can hold (normalised units), None when unbounded or not a
        hard bound. Error feedback carries only the part of a residual the device can reach."""
        return None

    def scale_of(self, W: Tensor) -> float:
        """The magnitude that maps to w̃ = 1 (times the periphery's headroom): max |W|."""
        return float(W.abs().max())

    def mapping_scale(self, W: Tensor, headroom: float) -> float:
        """w_scale of a tile holding W: headroom × scale_of(W) (a digital device holding absolute
        values returns 1)."""
        scale = self.scale_of(W)
        return headroom * (scale if scale > 0 else 1.0)

    def device_mvm(self, state, x: Tensor, transpose: bool) -> Tensor | None:
        """A device with its own arithmetic (a digital datapath) returns x w̃ᵀ (or x w̃ when
        ``transpose``) in normalised units; None uses the analog path of the tile."""
        return None

    def output_noise_var(self, y: Tensor) -> Tensor | None:
        """Extra signal-dependent output noise variance (normalised units), e.g. shot noise."""
        return None

    def noise_rms(self, state) -> float:
        """rms of the read noise over cells (normalised units), for settle tolerances."""
        std = self.read_std(state)
        if std is None:
            return 0.0
        return float(std) if not isinstance(std, Tensor) else float(std.square().mean().sqrt())


class IdealState(NamedTuple):
    w: Tensor


@dataclass(frozen=True, kw_only=True)
class IdealDevice(Device):
    """Exact float weights: programs, reads and updates are exact, no noise, no bounds."""

    kind: ClassVar[str] = "ideal"
    name: str = "ideal"
    dw_pulse: float = 1e-3  # in-array updates: the exact change of w̃ per pulse

    def __post_init__(self):
        check_range("dw_pulse", self.dw_pulse, lo=0.0, lo_open=True, hi=1.0)

    def init_state(self, shape, generator, dtype, device) -> IdealState:
        return IdealState(torch.zeros(shape, dtype=dtype, device=device))

    def program(self, state, w, generator) -> IdealState:
        return IdealState(w.clone())

    def mean(self, state) -> Tensor:
        return state.w

    def update(self, state, dw, generator):
        return IdealState(state.w + dw), UpdateCounts(0, 0, 0, 0)

    def symmetry_point(self, state) -> Tensor:
        """Up and down pulses are equal and opposite everywhere: the reference is 0."""
        return torch.zeros_like(state.w)

    def apply_pulses(self, state, n_up, n_down, generator):
        """Every pulse moves w̃ by exactly ±dw_pulse (no bounds, no noise)."""
        return IdealState(state.w + (n_up - n_down) * self.dw_pulse), UpdateCounts(n_up.sum(), n_down.sum(), 0, 0)


class Tile:
    """One weight matrix (out × in) held by ``device`` behind ``periphery``.

    ``W`` is programmed at construction; w_scale = periphery.w_headroom × device.scale_of(W) maps
    logical weights to w̃ ∈ [−1, 1]. Inputs are divided by ``in_scale`` before the DAC.
    """

    READS = ("output", "per_cell")

    def __init__(self, device: Device, periphery: Periphery, W: Tensor, *, seed: int, noise: NoiseBank | None = None,
                 in_scale: float = 1.0, name: str = "tile", read: str = "output"):
        if read not in self.READS:
            raise ConfigError(f"read={read!r} is not a read model; choose one of: {', '.join(self.READS)}")
        self.read_model = read
        if W.ndim != 2:
            raise DeviceError(f"{name}: a tile holds a matrix, got shape {tuple(W.shape)}")
        self.device, self.periphery, self.name = device, periphery, name
        self.shape = tuple(W.shape)
        # on the tile's own device: CPU streams as before; on CUDA drawn there, no host copy
        self.gen = torch.Generator(device=W.device).manual_seed(int(seed))
        self.noise = noise
        self.in_scale = float(in_scale)
        self.w_scale = device.mapping_scale(W.detach(), periphery.w_headroom)
        self.state = device.init_state(self.shape, self.gen, W.dtype, W.device)
        # the operations of every read (multiply-accumulates in the array, DAC / ADC conversions
        # where the periphery has a converter: Python ints from the shapes, no device sync) and of
        # every write (pulse counts: ints or tensors, summed lazily); see mep_hw.hw.cost
        self._reads = [0, 0, 0]
        self._writes = [0, 0, 0, 0]
        self.remaps = 0  # re-programs with a larger mapping scale (remap_if_saturating)
        # energies from what the array holds (read: V²·Σ f(x̃)·ΣG·t; write: the device's pulses),
        # accumulated as tensors without a host sync; see energy_totals()
        self.energy: dict = {"read_J": 0.0, "write_J": 0.0}
        self._cache: dict = {}
        self._dac_cache: dict = {}
        self._read_std = None
        self._dac_unit = periphery.dac_step if periphery.dac_bits else 1.0
        self._k = self._dac_unit / periphery.adc_step if periphery.adc_bits else 1.0
        # the device adds output (detector) noise of its own: asked, not guessed from its type
        self._shot = device.output_noise_var(torch.ones(1, 1, dtype=W.dtype, device=W.device)) is not None
        self._managed = periphery.noise_management != "none" or periphery.bound_management != "none"
        self.program(W)

    # ------------------------------------------------------------------ state
    def _changed(self):
        self._cache = {}
        self._dac_cache = {}  # the cached noise std depends on the state
        self._read_std = self.device.read_std(self.state)
        # constants of the read path, fixed until the state (or the mapping) changes
        p = self.periphery
        self._is_digital = type(self.device).device_mvm is not Device.device_mvm
        self._is_exact = (self._read_std is None and p.dac_bits == 0 and p.adc_bits == 0 and p.out_noise == 0
                          and not self._shot and not self._managed)
        self._alpha = self.w_scale * self.in_scale * self._dac_unit / self._k
        self._adc_b = p.adc_bound / p.adc_step if p.adc_bits else 0.0

    def _cached(self, key: str):
        c = self._cache
        if key not in c:
            if key == "held":
                c[key] = self.device.mean(self.state) * self.w_scale
            elif key == "norm":  # normalised weights, (out, in)
                c[key] = self.device.mean(self.state)
            elif key == "held_t":
                c[key] = self._cached("held").T
            elif key == "norm_k":  # normalised weights in ADC codes per DAC code
                c[key] = self._cached("norm") * self._k
            elif key == "norm_k_t":
                c[key] = self._cached("norm_k").T
            elif key == "var":  # per-cell read variance, (out, in)
                std = self._read_std
                c[key] = std.square() if isinstance(std, Tensor) else (None if std is None else float(std) ** 2)
            elif key == "var_t":
                v = self._cached("var")
                c[key] = v.T.contiguous() if isinstance(v, Tensor) else v
            elif key in ("e_fwd", "e_bwd"):  # read energy per input line at full-scale input (J)
                c[key] = self.device.read_energy_lines(self.state, key == "e_bwd")
        return c[key]

    def _count(self, c: UpdateCounts):
        w = self._writes
        for i, v in enumerate(c[:4]):
            w[i] = w[i] + v
        e = c.write_J
        if not (isinstance(e, float) and e == 0.0):
            self.energy["write_J"] = self.energy["write_J"] + e

    def _read_energy(self, xs: Tensor, transpose: bool) -> None:
        """Add the energy of one read with normalised inputs ``xs`` (B, n_in): Σ_b Σ_j f(x̃_bj) ·
        (V_read² · t_read · Σ_i G_ij), f = |x̃| (pulse-width coding) or x̃² (amplitude coding)."""
        lines = self._cached("e_bwd" if transpose else "e_fwd")
        if lines is None:
            return
        f = xs.abs() if self.device.input_coding == "pulse_width" else xs * xs
        if self.periphery.dac_bits:
            f = f.clamp(max=self.periphery.dac_bound if self.device.input_coding == "pulse_width" else self.periphery.dac_bound**2)
        self.energy["read_J"] = self.energy["read_J"] + torch.dot(f.sum(0), lines.to(f.dtype))

    def energy_totals(self) -> dict[str, float]:
        """Read and write energy so far (J) and the present holding power (W), as floats (one host
        sync: call at the end of an epoch, not per read)."""
        return {"read_J": float(self.energy["read_J"]), "write_J": float(self.energy["write_J"]),
                "static_W": float(self.device.static_power_W(self.state))}

    def op_counts(self):
        """Reads and writes of this tile so far, as an :class:`~mep_hw.hw.store.OpCounts`."""
        from mep_hw.hw.store import OpCounts

        macs, dac, adc = self._reads
        up, down, refreshes, programmed = (int(v) for v in self._writes)
        e = self.energy_totals()
        return OpCounts(macs, dac, adc, up, down, refreshes, programmed, e["read_J"], e["write_J"], e["static_W"])

    def state_dict(self) -> dict:
        return {"state": dict(self.state._asdict()), "gen": self.gen.get_state(),
                "counts": self.op_counts()._asdict(), "w_scale": self.w_scale, "remaps": self.remaps}

    def load_state_dict(self, d: dict) -> None:
        self.state = type(self.state)(**d["state"])
        self.gen.set_state(d["gen"])
        c = d["counts"]
        self._reads = [c["macs"], c["dac"], c["adc"]]
        self._writes = [c["pulses_up"], c["pulses_down"], c["refreshes"], c["programmed"]]
        self.energy = {"read_J": float(c.get("read_J", 0.0)), "write_J": float(c.get("write_J", 0.0))}
        self.w_scale = float(d["w_scale"])
        self.remaps = int(d.get("remaps", 0))
        self._changed()

    def program(self, W: Tensor, cells: Tensor | None = None) -> Tensor:
        """Write logical weights W (only the ``cells`` of a boolean mask, if given: the others
        keep their state); returns what the tile holds afterwards."""
        w = W.detach() / self.w_scale
        new = self.device.program(self.state, w, self.gen)
        if cells is not None:
            new = type(new)(*(torch.where(cells, a, b) if isinstance(a, Tensor) and a.shape == cells.shape else a
                              for a, b in zip(new, self.state)))
        self.state = new
        self._count(UpdateCounts(0, 0, 0, int(w.numel() if cells is None else cells.sum())))
        self._changed()
        return self.held()

    def held(self) -> Tensor:
        """The logical weights held now, without read noise (cached until the state changes)."""
        return self._cached("held")

    def read(self) -> Tensor:
        """One noisy read of the logical weights."""
        return self.device.read(self.state, self.noise) * self.w_scale

    def write(self, dW: Tensor, seconds: float = 0.0) -> Tensor:
        """Apply an intended change dW through the device; returns the change achieved."""
        before = self.held()
        self.state, counts = self.device.update(self.state, (dW / self.w_scale).to(before.dtype), self.gen)
        if seconds:
            self.state = self.device.advance(self.state, seconds)
        self._count(counts)
        self._changed()
        self.remap_if_saturating()
        return self.held() - before

    def remap_if_saturating(self) -> bool:
        """Re-program the tile with a larger mapping scale when the ``w_remap_quantile``-quantile of
        its |w̃| has reached the periphery's ``w_remap`` fraction of the range (aihwkit's weight
        remapping): w_scale = w_headroom × that quantile of |w|, every cell written again
        (write-verify, with programming noise, counted as programmed cells; a cell beyond the new
        range is clipped to it). Only on devices whose scale is a free periphery factor."""
        per = self.periphery
        if not per.w_remap or not self.device.remappable:
            return False
        held = self.held()
        a = held.abs().reshape(-1)
        limit = per.w_remap * self.weight_bound
        if float(a.max()) < limit:  # the quantile is at most the largest: nothing to do (cheap)
            return False
        q = float(a.kthvalue(max(1, math.ceil(per.w_remap_quantile * a.numel()))).values)
        if q < limit:
            return False
        W = held.clone()
        self.w_scale = per.w_headroom * q
        self.program(W)
        self.remaps += 1
        return True

    def apply_pulses(self, n_up: Tensor, n_down: Tensor, seconds: float = 0.0) -> None:
        """Apply per-cell pulse counts (an in-array update: coincidences of row and column pulse
        trains) with the device's pulse physics (``Device.apply_pulses``)."""
        self.state, counts = self.device.apply_pulses(self.state, n_up, n_down, self.gen)
        if seconds:
            self.state = self.device.advance(self.state, seconds)
        self._count(counts)
        self._changed()

    @property
    def weight_bound(self) -> float | None:
        """The largest |w| (logical units) the tile can hold, None when the device has no hard bound."""
        lim = self.device.weight_limit
        return None if lim is None else lim * self.w_scale

    @property
    def dw_pulse(self) -> float:
        """The change of a logical weight per pulse at the symmetry point (device units × w_scale)."""
        return float(self.device.dw_pulse) * self.w_scale

    def advance(self, seconds: float) -> None:
        """Let time pass for the device (drift)."""
        if seconds:
            self.state = self.device.advance(self.state, seconds)
            self._changed()

    # ------------------------------------------------------------------ MVM through the periphery
    @property
    def digital(self) -> bool:
        """The device computes the product itself (a digital datapath)."""
        return self._is_digital

    @property
    def exact(self) -> bool:
        """No read noise and ideal converters: the read is a plain matrix product."""
        return self._is_exact

    def _dac(self, x: Tensor, x_in_bound: bool, slot: str):
        """(DAC codes, ‖codes‖ per row) of the inputs. A settle reads the same clamped input x at
        every step: the codes of the last input tensor of each read direction (``slot``) are
        kept (a DAC holds its output), with the noise std that goes with them."""
        last = self._dac_cache.get(slot)
        if last is not None and last[0] is x and last[4] == x._version:  # same tensor, not modified since
            return last[1], last[2], last
        p = self.periphery
        xs = x if self.in_scale == 1.0 else x / self.in_scale
        if p.dac_bits:
            xs = xs.mul(1.0 / p.dac_step) if x_in_bound else xs.clamp(-p.dac_bound, p.dac_bound).mul_(1.0 / p.dac_step)
            xs = xs.round_()  # integer DAC codes; the DAC step is folded into the output scale
        norm = torch.linalg.vector_norm(xs, dim=1, keepdim=True)
        entry = [x, xs, norm, None, x._version]
        self._dac_cache[slot] = entry
        return xs, norm, entry

    def _mvm(self, x: Tensor, Wk: Tensor, var, add: Tensor | None, x_in_bound: bool, slot: str) -> Tensor:
        """add + α·ADC(DAC(x̃) w̃ + noise). ``Wk`` is w̃ (oriented (in, out)) pre-scaled by
        k = DAC step / ADC step, so the product of the DAC codes with it is already in ADC codes;
        ``var`` the per-cell read variance in the same orientation (or one number, or None)."""
        p = self.periphery
        xs, norm, entry = self._dac(x, x_in_bound, slot)
        step, k = self._dac_unit, self._k
        if self.read_model == "per_cell" and var is not None:
            # the reference read: every cell of every read draws its own noise, then the product
            std = var.sqrt() if isinstance(var, Tensor) else math.sqrt(var)
            cells = torch.randn((x.shape[0], *Wk.shape), generator=self.gen, dtype=torch.float64, device=Wk.device).to(Wk.dtype)
            y = torch.einsum("bi,bio->bo", xs, Wk + cells * (std * k))
            var = None
        else:
            y = xs @ Wk  # in ADC codes (in DAC steps when there is no ADC)
        extra = self.device.output_noise_var(y * (step / k)) if self._shot else None
        if var is not None or p.out_noise or extra is not None:
            # noise std in ADC codes per sample, std = value · u with u (B, 1) or (B, out)
            cached = entry[3]
            if cached is not None and extra is None:
                u, value = cached
            else:
                ok = p.out_noise * k / step  # output noise in ADC codes
                value = 1.0
                if var is None:
                    u = torch.full((y.shape[0], 1), ok, dtype=y.dtype, device=y.device)
                    if self.read_model == "per_cell":
                        entry[3] = None  # the cached (u, value) would skip the per-cell draw
                elif isinstance(var, Tensor):  # per-cell read noise: Var(ỹ_j) = Σ_i x̃_i² σ_ij²
                    u = ((xs * xs) @ var).mul_(k * k).add_(ok * ok).sqrt_()
                else:  # one σ for all cells: std = √(σ² ‖x̃‖² + o²) = σk · hypot(‖x̃‖, o/(σk))
                    value = math.sqrt(var) * k
                    u = torch.hypot(norm, self._scalar(ok / value, norm)) if ok else norm
                if extra is not None:
                    u = (u.square().mul_(value * value) + extra * (k / step) ** 2).sqrt_()
                    value = 1.0
                else:
                    entry[3] = (u, value)
            noise = self.noise.normal(y.shape) if self.noise is not None else torch.randn(y.shape, generator=self.gen, dtype=y.dtype, device=y.device)
            y = y.addcmul_(u, noise, value=value)  # y is the fresh product: in place, no new buffer
        b = self._adc_b
        if b:
            y = y.clamp_(-b, b).round_()
        alpha = self._alpha
        return y.mul_(alpha) if add is None else torch.add(add, y, alpha=alpha, out=y)

    def _ops(self, batch: int, n_in: int, n_out: int) -> None:
        r = self._reads
        r[0] += batch * n_in * n_out
        if self.periphery.dac_bits:
            r[1] += batch * n_in
        if self.periphery.adc_bits:
            r[2] += batch * n_out

    def _scalar(self, v: float, like: Tensor) -> Tensor:
        t = self._cache.get(("scalar", v))
        if t is None or t.dtype != like.dtype or t.device != like.device:
            t = self._cache[("scalar", v)] = torch.tensor(v, dtype=like.dtype, device=like.device)
        return t

    def mvm(self, x: Tensor, add: Tensor | None = None, *, x_in_bound: bool = False) -> Tensor:
        """add + x Wᵀ through DAC, device read (noise resampled per sample) and ADC.
        ``x_in_bound`` says the inputs already lie within the DAC bound (skips the clip)."""
        self._ops(x.shape[0], self.shape[1], self.shape[0])
        if self._is_digital:
            return self._digital(x, add, False)
        if self._is_exact:
            self._read_energy(x if self.in_scale == 1.0 else x / self.in_scale, False)
            Wt = self._cached("held_t")
            return x @ Wt if add is None else torch.addmm(add, x, Wt)
        if self._managed:
            return self._mvm_managed(x, self._cached("norm_k_t"), self._cached("var_t"), add, False)
        self._read_energy(x if self.in_scale == 1.0 else x / self.in_scale, False)
        return self._mvm(x, self._cached("norm_k_t"), self._cached("var_t"), add, x_in_bound, "fwd")

    def mvm_ref(self, x: Tensor, ref: Tensor) -> Tensor:
        """x (W − ref)ᵀ read against a reference array ``ref`` (logical units, the tile's shape):
        the reference columns' currents are subtracted from the tile's before the ADC (the
        zero-shifting reference of Tiki-Taka, Kim et al. 2019 / Gokmen 2021; aihwkit's reference
        devices with ``subtract_symmetry_point``). The reference is taken as exact (its own
        programming error and read noise are not modelled); the tile's read noise, DAC and ADC
        apply, and the ADC quantises the difference."""
        self._ops(x.shape[0], self.shape[1], self.shape[0])
        if self._is_digital or self._managed:
            raise DeviceError(f"{self.name}: a read against a reference needs an analog tile without noise or bound management")
        self._read_energy(x if self.in_scale == 1.0 else x / self.in_scale, False)
        if self._is_exact:
            return x @ (self.held() - ref).T
        Wk = (self._cached("norm") - ref / self.w_scale).mul_(self._k).T
        return self._mvm(x, Wk, self._cached("var_t"), None, False, "ref")

    def mvm_t(self, u: Tensor, add: Tensor | None = None, *, x_in_bound: bool = False) -> Tensor:
        """add + u W: the transpose read from the same cells."""
        self._ops(u.shape[0], self.shape[0], self.shape[1])
        if self._is_digital:
            return self._digital(u, add, True)
        if self._is_exact:
            self._read_energy(u if self.in_scale == 1.0 else u / self.in_scale, True)
            W = self.held()
            return u @ W if add is None else torch.addmm(add, u, W)
        if self._managed:
            return self._mvm_managed(u, self._cached("norm_k"), self._cached("var"), add, True)
        self._read_energy(u if self.in_scale == 1.0 else u / self.in_scale, True)
        return self._mvm(u, self._cached("norm_k"), self._cached("var"), add, x_in_bound, "bwd")

    def _mvm_managed(self, x: Tensor, Wk: Tensor, var, add: Tensor | None, transpose: bool) -> Tensor:
        """The read with aihwkit-style noise and bound management (opt-in, see Periphery):
        ``abs_max`` noise management divides each input vector by α = max|x̃| (capped at nm_thres
        when set) before the DAC and multiplies the output by α, so small inputs use the full DAC
        range; ``iterative`` bound management reads again, with the inputs halved, every vector
        whose output hit the ADC bound, until none does or the reduction passes max_bm_factor or
        max_bm_res over the DAC resolution (aihwkit BoundManagementType.ITERATIVE; here for
        transposed reads too). Every extra pass is counted (MACs, conversions, read energy)."""
        p = self.periphery
        xs = x if self.in_scale == 1.0 else x / self.in_scale
        B = xs.shape[0]
        if p.noise_management == "abs_max":
            alpha = xs.abs().amax(dim=1, keepdim=True)
            if p.nm_thres > 0:
                alpha = alpha.clamp(max=p.nm_thres)
            alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
        else:
            alpha = torch.ones(B, 1, dtype=xs.dtype, device=xs.device)
        step, k = self._dac_unit, self._k
        ok = p.out_noise * k / step
        b = self._adc_b
        out = torch.empty(B, Wk.shape[1], dtype=xs.dtype, device=xs.device)
        rows = torch.arange(B, device=xs.device)
        reduction, first = 1.0, True
        res_limit = p.max_bm_res / (p.dac_step / (2 * p.dac_bound)) if p.dac_bits else math.inf
        while True:
            scale = alpha[rows] * reduction
            xin = xs[rows] / scale
            self._read_energy(xin, transpose)
            if not first:  # the first pass is counted by mvm / mvm_t
                self._ops(rows.numel(), Wk.shape[0], Wk.shape[1])
            first = False
            if p.dac_bits:
                xin = xin.clamp(-p.dac_bound, p.dac_bound).mul_(1.0 / p.dac_step).round_()
            y = xin @ Wk
            u2 = torch.full((y.shape[0], 1), ok * ok, dtype=y.dtype, device=y.device)
            if isinstance(var, Tensor):
                u2 = u2 + ((xin * xin) @ var) * (k * k)
            elif var is not None:
                u2 = u2 + (xin * xin).sum(1, keepdim=True) * (var * k * k)
            if self._shot:
                extra = self.device.output_noise_var(y * (step / k))
                if extra is not None:
                    u2 = u2 + extra * (k / step) ** 2
            if bool((u2 > 0).any()):
                noise = self.noise.normal(y.shape) if self.noise is not None else \
                    torch.randn(y.shape, generator=self.gen, dtype=torch.float64, device=y.device).to(y.dtype)
                y = y + u2.sqrt() * noise
            if b:
                y = y.clamp_(-b, b).round_()
            out[rows] = y * scale
            if p.bound_management == "none" or not b:
                break
            hit = (y.abs() >= b).any(dim=1)
            reduction *= 2.0
            if not bool(hit.any()) or reduction > p.max_bm_factor or reduction > res_limit:
                break
            rows = rows[hit]
        alpha_t = self._alpha
        return out.mul_(alpha_t) if add is None else torch.add(add, out, alpha=alpha_t)

    def _digital(self, x: Tensor, add: Tensor | None, transpose: bool) -> Tensor | None:
        xs = x if self.in_scale == 1.0 else x / self.in_scale
        y = self.device.device_mvm(self.state, xs, transpose)
        if y is None:
            return None
        alpha = self.w_scale * self.in_scale
        return y.mul_(alpha) if add is None else torch.add(add, y, alpha=alpha)

    def noise_rms_out(self, x_rms: float, n_in: int) -> float:
        """Expected rms of one output's noise (logical units) for inputs of rms ``x_rms``: read
        noise, output noise and ADC rounding (step/√12)."""
        p = self.periphery
        rms = self._cache.get("noise_rms")
        if rms is None:  # a reduction over the cells: once per state
            rms = self._cache["noise_rms"] = self.device.noise_rms(self.state)
        var = (rms**2) * n_in * x_rms**2 + p.out_noise**2 + (p.adc_step**2) / 12.0
        if self._shot:  # detector noise at outputs of the typical size x_rms·‖row of w̃‖
            w = self._cached("norm")
            rows = w if n_in == self.shape[1] else w.T
            y = x_rms * rows.square().sum(dim=1).sqrt()
            extra = self.device.output_noise_var(y)
            if extra is not None:
                var += float(extra.mean())
        return math.sqrt(var) * self.w_scale * self.in_scale

"""Hardware cost accounting: operation counts → energy and latency, from a card's ``[cost]`` table.

Counts (kept by every :class:`~mep_hw.hw.base.Tile` and by the training loop):

* MACs in the array: a read of an out × in array for a batch of B inputs is B·out·in
  multiply-accumulates, forward (W·x) and transposed (Wᵀ·u) alike;
* DAC conversions: B·n_in per read, ADC conversions: B·n_out per read (none where the periphery
  has no converter, e.g. the FPGA datapath);
* programming pulses (up and down) and refreshes, from the device's ``update``;
* host FLOPs: the EP estimate's outer products and the host optimizer's update (Adam, Muon's
  Newton–Schulz, Dion's power iteration and QR), see :mod:`mep_hw.host.flops`, and Tiki-Taka's
  transfer buffer;
* neuron operations: the elementwise arithmetic of the neuron circuits beside the arrays, on the
  converted column outputs — the settle's state update (``NEURON_OPS_PER_UPDATE`` per neuron and
  field evaluation: leak, integrate, step, clip), the EP neuron's ρ(s⁺) − ρ(s⁻) of signed phases,
  backprop's activation, loss gradient and ρ' mask. Local to a neuron: no host round trip;
* settle time per sample and phase, in units of the time constant τ.

Energy (per sample) = E_read + DAC·e_dac + ADC·e_adc + E_write + refreshes·e_refresh
+ P_static·latency + host FLOPs·e_flop + neuron ops·e_neuron_op, where

* E_read, the array's read energy, is computed from what the array holds when the device models
  it (crossbars: V_read²·t_read·Σ_j f(x̃_j)·Σ_i G_ij per read, accumulated by the tile, f = |x̃|
  for pulse-width and x̃² for amplitude input coding), else MACs·e_mac (the MZI's laser, the
  FPGA's DSP slices);
* E_write is the pulses' electrical energy when the device models it (V²·t·(G_before + G_after)/2
  per pulse on a resistive cell, NeuroSim's writeEnergy; V²·C on a gate), else pulses·e_pulse;
* P_static is the power the arrays draw to hold their state (thermo-optic phase shifters:
  P_π·φ/π each), times the settle latency of the sample. Latency (per sample and phase) = settle time × τ for a continuous-time array
(``tau_s``: seconds per unit of settle time); for a clocked datapath (``fixed_point`` cards) one
field evaluation takes ⌈MACs per evaluation / macs_per_cycle⌉ clock cycles, so latency = steps ×
stages × cycles / clock_hz. The bottom-up pass that initialises the free phase adds one read (τ)
per layer, or its MACs' cycles. Programming time and host time are not in the latency. NeuroSim
(Peng et al., IEDM 2019; Chen et al., TCAD 2018) is the reference for circuit-level estimates of
this kind; this accounting is architectural: it multiplies counted operations by per-operation
constants, each with its source in the card.

A quantity whose constant the card does not give is reported as missing (``missing`` lists
the fields to add to the card's ``[cost]`` table); :func:`cost_summary` with ``strict=True``
raises ConfigError naming them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from mep_hw.errors import ConfigError
from mep_hw.hw.base import check_range

__all__ = ["CostConstants", "CostCounts", "cost_summary", "HOST_E_FLOP_J", "NEURON_E_OP_J", "NEURON_OPS_PER_UPDATE",
           "COST_FIELDS"]

# Host energy per FLOP (assumption): an NVIDIA H100 SXM at its 700 W TDP doing its 67 TFLOP/s of
# FP32 (non-tensor-core) work, 700 / 67e12 = 1.04e-11 J per FLOP (NVIDIA H100 datasheet, 2023).
HOST_E_FLOP_J = 1.04e-11
# Neuron-circuit energy per elementwise operation on the converted (8-bit) column outputs: the
# dearer of an 8-bit integer add (0.03 pJ) and multiply (0.2 pJ) at 45 nm, 0.9 V (Horowitz,
# "Computing's energy problem", ISSCC 2014) — an upper figure for a subtraction, a clip or a
# 0/1 mask.
NEURON_E_OP_J = 2.0e-13
# Operations of one neuron's state update per field evaluation: leak (f − s), integrate (·dt),
# step (s + …) and clip to the activation's box.
NEURON_OPS_PER_UPDATE = 4


@dataclass(frozen=True, kw_only=True)
class CostConstants:
    """The ``[cost]`` table of a card (None: not given)."""

    tau_s: float | None = None  # seconds per unit of settle time τ (continuous-time arrays)
    e_mac_J: float | None = None  # energy per multiply-accumulate in the array / datapath
    e_dac_J: float | None = None  # per DAC conversion
    e_adc_J: float | None = None  # per ADC conversion
    e_pulse_J: float | None = None  # per programming pulse
    e_refresh_J: float | None = None  # per refresh of a differential pair
    macs_per_cycle: float | None = None  # clocked datapaths: parallel MAC units
    host_e_flop_J: float = HOST_E_FLOP_J  # the digital host
    e_neuron_op_J: float = NEURON_E_OP_J  # the neuron circuits' elementwise arithmetic

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                check_range(f"[cost] {f.name}", v, lo=0.0, lo_open=f.name in ("tau_s", "macs_per_cycle"))


COST_FIELDS = frozenset(f.name for f in fields(CostConstants))


class CostCounts(NamedTuple):
    samples: int
    macs: int
    dac: int
    adc: int
    pulses: int  # up + down
    refreshes: int
    host_flops: int
    settle_time_tau: float  # summed over samples and phases, units of τ
    settle_steps: float  # summed over samples and phases
    phases: int  # settle phases per sample (1 at inference, 1 + nudged phases in training)
    read_J: float = 0.0  # read energy from the held conductances (devices that model it)
    write_J: float = 0.0  # pulse energy from the device's write voltages (devices that model it)
    static_W: float = 0.0  # holding power of the arrays (W)
    neuron_ops: float = 0.0  # the neuron circuits' elementwise operations (see the module docstring)


def cost_summary(const: CostConstants | None, c: CostCounts, *, kind: str, clock_hz: float | None = None,
                 macs_per_eval: int = 0, stages: int = 1, init_reads: int = 0, init_macs: int = 0,
                 read_energy: bool = False, write_energy: bool = False, strict: bool = False) -> dict[str, Any]:
    """Per-sample counts, energy (J) and latency (s) of ``c`` (see the module docstring).

    ``macs_per_eval``: MACs of one field evaluation for one sample (clocked latency);
    ``stages``: field evaluations per solver step; ``init_reads`` / ``init_macs``: the bottom-up
    pass that initialises the free phase, per sample (``init_reads`` sequential array reads of one
    τ each; ``init_macs`` MACs on a clocked datapath). ``read_energy`` / ``write_energy``: the
    device computed ``c.read_J`` / ``c.write_J`` from its physics (else e_mac / e_pulse are used).
    """
    n = max(c.samples, 1)
    per = {"macs": c.macs / n, "dac": c.dac / n, "adc": c.adc / n, "pulses": c.pulses / n,
           "refreshes": c.refreshes / n, "host_flops": c.host_flops / n,
           "settle_time_tau": c.settle_time_tau / n, "settle_steps": c.settle_steps / n,
           "read_J": c.read_J / n, "write_J": c.write_J / n, "neuron_ops": c.neuron_ops / n}
    const = const or CostConstants()
    missing = []

    def need(name: str, used: bool) -> float:
        v = getattr(const, name)
        if used and v is None:
            missing.append(name)
        return v or 0.0

    parts = {
        "array": c.read_J / n if read_energy else per["macs"] * need("e_mac_J", per["macs"] > 0),
        "dac": per["dac"] * need("e_dac_J", per["dac"] > 0),
        "adc": per["adc"] * need("e_adc_J", per["adc"] > 0),
        "programming": (c.write_J / n if write_energy else per["pulses"] * need("e_pulse_J", per["pulses"] > 0))
        + per["refreshes"] * need("e_refresh_J", per["refreshes"] > 0),
        "host": per["host_flops"] * const.host_e_flop_J,
        "neurons": per["neuron_ops"] * const.e_neuron_op_J,
    }
    energy_missing = list(missing)
    if kind == "fixed_point":
        mpc = need("macs_per_cycle", True)
        if clock_hz is None:
            missing.append("clock_hz")
        cycles = math.ceil(macs_per_eval / mpc) if mpc else 0
        init = math.ceil(init_macs / mpc) if mpc else 0
        latency = (per["settle_steps"] * stages * cycles + init) / clock_hz if (mpc and clock_hz) else None
    else:
        tau = need("tau_s", True)
        latency = (per["settle_time_tau"] + init_reads) * tau if tau else None
    if c.static_W:  # holding power over the time the sample occupies the arrays
        parts["static"] = c.static_W * latency if latency is not None else 0.0
        if latency is None:
            energy_missing.append("tau_s")
    out = {
        "samples": c.samples, "per_sample": per,
        "energy_J_per_sample": None if energy_missing else {**parts, "total": sum(parts.values())},
        "latency_s_per_sample": latency,
        "latency_s_per_phase": None if latency is None else latency / max(c.phases, 1),
        "static_W": c.static_W,
        "missing": sorted(set(missing)),
    }
    if strict and missing:
        raise ConfigError(f"the card lacks the cost constant(s) {', '.join(sorted(set(missing)))}; "
                          "add them to its [cost] table (with a [sources] entry each) or --set them")
    return out

"""Resistive crossbar devices (PCM, ReRAM, ECRAM, FeFET): a differential conductance pair per
weight, w̃ = (G⁺ − G⁻) / (g_max − g_min), in physical units (µS, s, V, J).

**Pulse response** (one device, one pulse, direction d ∈ {up, down}; all models keep the
conductance continuous and clip it to [g_min, g_max,dev] after every pulse):

* ``linear``, ``exponential``, ``table`` — NeuroSim's pulse-position models (Chen, Peng & Yu,
  IEEE TCAD 37, 3067 (2018); MLP+NeuroSim V3.0 ``RealDevice::Write`` / ``MeasuredDevice``): the
  device sits at a position x on its curve G_d(x), x ∈ [0, P_d], P_d = levels_d − 1 pulses across
  the range. A pulse moves x by one (x = G_d⁻¹(G), G ← G_d(x ± s)); after cycle-to-cycle noise the
  position is recomputed from G, so the conductance stays continuous. ``exponential``:
  G_d(x) = g_min + B_d (1 − e^(−x/A_d)), B_d = R / (1 − e^(−P_d/A_d)), A_d = a(NL_d)·P_d with
  NeuroSim's nonlinearity label NL_d of either sign (:func:`neurosim_a`; a negative label gives a
  convex curve: a negative LTD label is the usual saturating depression, a positive one retraces
  the LTP shape). Depression moves back along its own curve: G ← G_ltd(x_ltd − s). ``linear`` is
  the A → ∞ limit; ``table`` interpolates measured curves (:class:`ResponseTable`).
* ``linear_step``, ``soft_bounds``, ``pow_step`` — aihwkit's pulsed devices (Rasch et al., IEEE
  AICAS 2021; ``LinearStepDevice``, ``SoftBoundsDevice``, ``PowStepDevice``): with the reference
  conductance G_ref = g_min + step_ref_frac·R of the card's nominal range (aihwkit's w = 0, the
  same for every device),
  ΔG↑ = s↑ (1 − γ↑ (G − G_ref)/(g_max − G_ref)),  ΔG↓ = s↓ (1 − γ↓ (G_ref − G)/(G_ref − g_min)),
  g_max the nominal bound for ``linear_step`` (aihwkit ``mean_bound_reference = True``, its
  default: the slopes divide by the mean bounds; a device's own g_max,dev only clips) and the
  device's own bound for ``soft_bounds`` (γ↑ = γ↓ = 1: the step vanishes at that device's bounds
  and equals dw_min at G_ref);
  ``pow_step``: ΔG↑ = s↑ ω^γ↑, ΔG↓ = s↓ (1 − ω)^γ↓, ω = (g_max − G)/R.

Step sizes carry the systematic up/down asymmetry a and, per device, a step-size spread
(``dw_dtod``) and an up/down spread r (``up_down_dtod``): s↑ = Δg·f_dev (1 + a/2 + r),
s↓ = Δg·f_dev (1 − a/2 − r) (for position models, in pulse positions). **Cycle-to-cycle noise**
per pulse (``c2c_model``): ``multiplicative`` ΔG (1 + σξ) (aihwkit ``mult_noise``), ``additive``
ΔG + σ·s·ξ (aihwkit additive), ``range`` ΔG + σ·(g_max,dev − g_min)·ξ (NeuroSim's
``sigmaCtoC``, a fraction of the conductance range per pulse).

**Mapping** (:meth:`CrossbarDevice.to_physical`): a ``bidirectional`` pair holds w̃ = 0 with both
devices at c = G* of the nominal device (:attr:`CrossbarDevice.g_center`: where its expected up
and down steps are equal, mid-range if they never are; aihwkit: w = 0 is the symmetry point), so
one pulse at w̃ = 0 moves the pair by ``dw_pulse``, and splits |w̃| between the devices in
proportion to their room on that side: G⁺ = c + w̃⁺(g_max − c) − w̃⁻(c − g_min),
G⁻ = c − w̃⁺(c − g_min) + w̃⁻(g_max − c), w̃± = max(±w̃, 0). (G⁺ − G⁻)/R = w̃ for every
w̃ ∈ [−1, 1], with (g_max, g_min) at w̃ = 1, for any c. A ``unidirectional`` pair keeps one device
at g_min: G± = g_min + w̃±·R.

**Pairs**: a ``bidirectional`` pair takes each weight-up pulse as an up pulse on G⁺ and a down
pulse on G⁻ (coincident pulses on the two columns of the pair), so the nominal weight step is
(ΔG↑ + ΔG↓)/R; a ``unidirectional`` pair (PCM: SET pulses only) potentiates G⁺ for weight-up and
G⁻ for weight-down pulses, and a pair whose larger device is above ``refresh_upper`` of its range
while the smaller is above ``refresh_lower`` is re-programmed to its present weight (aihwkit
``OneSidedUnitCell``'s refresh criterion). Pulses are applied one by one (n pulses at once are
exactly n single pulses; up and down pulses of one call are interleaved, up first).

**Pulse application** (``pulse_application``, a simulation choice, not physics): ``per_pulse``
(the default, the reference) applies the pulses one at a time as above. ``moments`` applies a
device's whole sequence of k pulses at once where its step is affine in G (``linear_step``,
``soft_bounds``, and NeuroSim's ``linear`` and ``exponential`` curves: x → x ± s on
G_d(x) = g_min + B_d(1 − e^(−x/A_d)) is G' = (g_min + B_d)(1 − b) + b·G, b = e^(∓s/A_d), inside the
range): one pulse is y' = a + b·y + (α + γ·y)·ξ (y = G − G₀; ξ ~ N(0, 1); α, γ from the c2c
model), so (1, E[y], E[y²]) evolves by a 3×3 lower-triangular matrix; the interleaved sequence
(alternating pairs, then the majority direction) is a product of matrix powers, taken by
repeated squaring, and the result is drawn as N(E[y], Var[y]) and clipped to the device's range
once. Mean and variance are exactly those of the per-pulse model while no pulse reaches a bound
(exact in distribution for one pulse); the higher moments are a normal's, and a sequence that
crosses a bound and turns back is clipped only at its end. Write energy, where G-dependent, uses
the mean of the start and end conductances for every pulse. Sequences of at most
``MOMENTS_MIN_PULSES`` (16) pulses are still pulsed one at a time (as cheap, and exact), and so is
a device whose start or expected end lies within ``BOUND_SIGMAS`` (3) standard deviations of the
end distribution of a bound (there the per-pulse clipping matters); other responses are pulsed one
at a time whatever this field says.

**Programming** (write-verify): the target is rounded to the device's programmable states when
``levels`` > 0 (pulse positions G_up(k) for the position models — uniform in pulse number, not in
G; a uniform grid in G otherwise), then programming noise is added: ``relative`` σ = prog_noise·R,
clipped to the device's range (a device cannot be programmed past its extremes: near a bound the
distribution is truncated), or PCM's σ(g) = c₀ + c₁g + c₂g² µS, g = G/g_max (Nandakumar et al.,
ICECS 2019; aihwkit ``PCMLikeNoiseModel``, fitted at g_max = 25 µS and scaled by g_max/25),
clipped at 0 only, as aihwkit does.

**Reading**: ``constant`` read noise σ = read_noise·R per device per read, or PCM's 1/f noise
σ(G, t) = read_noise·|G(t)|·Q_s(g_prog)·√ln((t + t_read)/(2 t_read)), Q_s(g) = min(0.0088 /
max(g^0.65, 10⁻³), 0.2), t the time since programming plus t₀ (Nandakumar 2019 as in aihwkit's
``PCMLikeNoiseModel``; each read draws independently from this distribution). Drift
G(t) = G_prog ((t − t_prog + t₀)/t₀)^(−ν): ``constant`` ν ~ N(ν̄, σ_ν) per device, or ``pcm``
ν = |N(μ(g), σ(g))| drawn at every write at g = the write's target conductance / g_max (aihwkit
draws it from ``g_target``, independent of the programming noise; a pulse's target is the
conductance it leaves), μ = clip(−0.0155 ln g + 0.0244, 0.049, 0.1),
σ = clip(−0.0125 ln g − 0.0059, 0.008, 0.045). A first-order IR drop scales w̃ by
(1 − ir_drop·i/(n_in − 1)) along the input lines.

**Energy**: a read with inputs x̃ draws V_read²·t_read·Σ_j f(x̃_j) Σ_i (G⁺_ij + G⁻_ij), f = |x̃|
(``pulse_width`` coding) or x̃² (``amplitude``); a pulse costs V_d²·t_d·(G_before + G_after)/2 on
a resistive cell (NeuroSim's ``writeEnergy``) plus V_d²·C (``c_write_F``, a gate capacitance).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from mep_hw.errors import ConfigError, DeviceError
from mep_hw.hw.base import INPUT_CODINGS, Device, UpdateCounts, check_range

__all__ = [
    "CrossbarDevice", "CrossbarState", "ResponseTable", "PulseResponse", "neurosim_a", "monotone_curve", "pcm_drift_nu", "pcm_read_qs",
    "RESPONSES", "UPDATE_MODES", "PROG_NOISE_MODELS", "READ_NOISE_MODELS", "DRIFT_MODELS", "C2C_MODELS",
]

RESPONSES = ("linear", "exponential", "table", "linear_step", "soft_bounds", "pow_step")
POSITION_RESPONSES = ("linear", "exponential", "table")  # NeuroSim: a pulse-position axis
UPDATE_MODES = ("unidirectional", "bidirectional")
PROG_NOISE_MODELS = ("none", "relative", "pcm")
READ_NOISE_MODELS = ("constant", "pcm")
DRIFT_MODELS = ("constant", "pcm")
C2C_MODELS = ("multiplicative", "additive", "range")
PULSE_APPLICATIONS = ("per_pulse", "moments")
# ΔG affine in G inside the range: k pulses have closed-form moments. NeuroSim's exponential curve
# is one: x → x ± s on G(x) = g_min + B(1 − e^(−x/A)) gives G' = (g_min + B)(1 − b) + b·G, b = e^(∓s/A)
AFFINE_RESPONSES = ("linear_step", "soft_bounds", "linear", "exponential")
# pulse_application = "moments": sequences longer than this go by their moments; shorter ones are
# pulsed one at a time (as cheap or cheaper there: benchmarks.devices pulses)
MOMENTS_MIN_PULSES = 16
# ... and only where the start and the expected end lie more than this many standard deviations (of
# the end) inside the device's range; nearer a bound a sequence would be clipped on its way
BOUND_SIGMAS = 3.0
_US = 1e-6  # siemens per µS
F64 = torch.float64


# ----------------------------------------------------------------------------- NeuroSim curve
@functools.lru_cache(maxsize=256)
def neurosim_a(nl: float) -> float:
    """|A| / P_max of NeuroSim's exponential weight-update curve for its nonlinearity label ``nl``.

    The normalised curve g(p) = (1 − e^(−p/a)) / (1 − e^(−1/a)), p ∈ [0, 1], deviates from the
    straight line by at most d(a) (at g'(p) = 1); NeuroSim's label is (990/98)·d(a): this
    reproduces all 900 entries of its ``getParamA`` table (labels 0.01 … 9, MLP+NeuroSim V3.0
    formula.cpp) to 5·10⁻⁵. Inverted by bisection; label 0 is linear (a = ∞). The sign of the
    label (the curvature) is applied by the caller: A = sign(nl)·a·P_max. Cached: the pulse
    model asks for it at every pulse step.
    """
    nl = abs(float(nl))
    if nl == 0.0:
        return math.inf

    def label(a):
        c = -math.expm1(-1.0 / a)
        p = -a * math.log(a * c)
        return (990.0 / 98.0) * (-math.expm1(-p / a) / c - p)

    lo, hi = math.log(1e-4), math.log(1e8)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if label(math.exp(mid)) > nl:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


# ----------------------------------------------------------------------------- PCM statistics
def pcm_read_qs(g_rel: Tensor) -> Tensor:
    """Q_s of the PCM 1/f read noise at normalised programmed conductance g = G/g_max
    (Nandakumar et al., ICECS 2019; aihwkit ``PCMLikeNoiseModel``)."""
    return (0.0088 / g_rel.abs().pow(0.65).clamp(min=1e-3)).clamp(max=0.2)


def pcm_drift_nu(g_rel: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std of the PCM drift exponent ν at g = G/g_max (Nandakumar 2019, as in aihwkit)."""
    lg = g_rel.abs().clamp(min=1e-7).log()
    return (-0.0155 * lg + 0.0244).clamp(0.049, 0.1), (-0.0125 * lg - 0.0059).clamp(0.008, 0.045)


# ----------------------------------------------------------------------------- measured tables
class ResponseTable(NamedTuple):
    """A measured pulse response, per measured device (curve): the conductance (µS) after k
    pulses, k = 0 … P, on a monotone curve through the measurements (:func:`monotone_curve`).
    ``up[c][k]``: potentiation from the bottom (increasing); ``down[c][k]``: depression from the
    top (decreasing). Cells draw one curve each at initialisation (device-to-device spread)."""

    up: tuple[tuple[float, ...], ...]
    down: tuple[tuple[float, ...], ...]
    source: str = ""

    @property
    def curves(self) -> int:
        return len(self.up)


def monotone_curve(pulses, g, increasing: bool = True) -> tuple[float, ...]:
    """A strictly monotone response through noisy measurements (pulse number, conductance), at
    integer pulse numbers 0 … round(max pulse). Pool-adjacent-violators isotonic regression
    (Barlow et al. 1972), then linear interpolation between the centroids of its blocks (the
    ends extended with the first / last segment's slope): no free parameter, and strictly
    monotone, as NeuroSim's look-up-table device requires."""
    pts = sorted(zip((float(p) for p in pulses), (float(v) for v in g)))
    if len(pts) < 2:
        raise ConfigError(f"a response curve needs at least 2 measured points, got {len(pts)}")
    sign = 1.0 if increasing else -1.0
    blocks: list[list[float]] = []  # [sum_x, sum_y, n]
    for x, y in pts:
        blocks.append([x, sign * y, 1.0])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] >= blocks[-1][1] / blocks[-1][2]:
            b = blocks.pop()
            blocks[-1] = [blocks[-1][0] + b[0], blocks[-1][1] + b[1], blocks[-1][2] + b[2]]
    cx = [b[0] / b[2] for b in blocks]
    cy = [b[1] / b[2] for b in blocks]
    n_out = max(1, round(pts[-1][0]))
    if len(cx) == 1:
        raise ConfigError("the measured curve is not monotone at all: isotonic regression leaves one flat block")
    out = []
    for k in range(n_out + 1):
        j = 0 if k <= cx[0] else (len(cx) - 2 if k >= cx[-1] else max(i for i in range(len(cx) - 1) if cx[i] <= k))
        t = (k - cx[j]) / (cx[j + 1] - cx[j])
        out.append(sign * (cy[j] + t * (cy[j + 1] - cy[j])))
    return tuple(out)


_TABLE_CACHE: dict = {}


def _table_tensors(table: ResponseTable, g_min: float, g_range: float, device, dtype) -> tuple[Tensor, Tensor]:
    """(up, down) normalised curves ĝ = (G − g_min)/R as tensors (curves, P + 1), both increasing
    in the position x: the down curve on NeuroSim's mirrored axis (x = P − pulses from the top)."""
    key = (id(table), g_min, g_range, str(device), dtype)
    hit = _TABLE_CACHE.get(key)
    if hit is None or hit[0] is not table:
        up = ((torch.tensor(table.up, dtype=F64) - g_min) / g_range).to(dtype).to(device)
        down = ((torch.tensor(table.down, dtype=F64) - g_min) / g_range).flip(-1).to(dtype).to(device)
        hit = _TABLE_CACHE[key] = (table, up, down)
    return hit[1], hit[2]


def _interp(curve: Tensor, x: Tensor) -> Tensor:
    """Piecewise-linear curve[x] on the integer grid 0 … L − 1 (x clamped to the grid)."""
    last = curve.shape[-1] - 1
    x = x.clamp(0.0, float(last))
    i = x.floor().clamp(max=last - 1).long()
    t = x - i
    return curve[i] * (1.0 - t) + curve[i + 1] * t


def _inverse(curve: Tensor, y: Tensor) -> Tensor:
    """Position x of value y on an increasing curve (clamped to [0, L − 1])."""
    last = curve.shape[-1] - 1
    i = (torch.searchsorted(curve, y.contiguous()) - 1).clamp(0, last - 1)
    lo, hi = curve[i], curve[i + 1]
    return i + ((y - lo) / (hi - lo)).clamp(0.0, 1.0)


class CrossbarState(NamedTuple):
    gp: Tensor  # G⁺ as written (µS), before drift
    gm: Tensor  # G⁻
    gmax_p: Tensor  # per-device upper bound (µS)
    gmax_m: Tensor
    dw_p: Tensor  # per-device step-size factor
    dw_m: Tensor
    stuck_p: Tensor  # int8: 0 free, +1 stuck on, −1 stuck off
    stuck_m: Tensor
    nu_p: Tensor  # drift exponents
    nu_m: Tensor
    tprog_p: Tensor  # time of the last write (s)
    tprog_m: Tensor
    t_now: float  # the device clock (s)
    ud_p: Tensor | None = None  # per-device up/down step bias r
    ud_m: Tensor | None = None
    curve_p: Tensor | None = None  # int64: measured curve of each device (response='table')
    curve_m: Tensor | None = None


class _Dev(NamedTuple):
    """Per-device parameters of a flat batch of devices (G⁺ and G⁻ cells together)."""

    gmax: Tensor
    dwf: Tensor
    ud: Tensor
    curve: Tensor | None


class _Pre(NamedTuple):
    """Per-device constants of the pulse response for a flat batch of devices."""

    gmax: Tensor
    rng: Tensor  # g_max,dev − g_min
    su: Tensor  # up step (µS; position models: positions per pulse)
    sd: Tensor
    cu: Tensor | None  # linear_step / soft_bounds: ΔG↑ = (cu − ku·G)⁺, |ΔG↓| = (cd + kd·G)⁺
    ku: Tensor | None
    cd: Tensor | None
    kd: Tensor | None
    bu: Tensor | None  # exponential: B of the up / down curve per device
    bd: Tensor | None
    curve: Tensor | None

    def slice(self, m: int) -> "_Pre":
        return _Pre(*(x[:m] if isinstance(x, Tensor) else x for x in self))


class _Moments(NamedTuple):
    """The moment map of one pulse (or of a sequence of them) on y = G − G₀:
    E[y'] = A + B·E[y],  E[y'²] = C0 + C1·E[y] + R·E[y²] (a lower-triangular 3×3 matrix on
    (1, E[y], E[y²]); tensors per device)."""

    A: Tensor
    B: Tensor
    C0: Tensor
    C1: Tensor
    R: Tensor

    def then(self, nxt: "_Moments") -> "_Moments":
        """This map, then ``nxt`` (the matrix product nxt · self)."""
        return _Moments(nxt.A + nxt.B * self.A, nxt.B * self.B, nxt.C0 + nxt.C1 * self.A + nxt.R * self.C0,
                        nxt.C1 * self.B + nxt.R * self.C1, nxt.R * self.R)

    @staticmethod
    def where(cond: Tensor, x: "_Moments", y: "_Moments") -> "_Moments":
        return _Moments(*(torch.where(cond, a, b) for a, b in zip(x, y)))

    def head(self, m: int) -> "_Moments":
        return _Moments(*(x[:m] for x in self))

    def put(self, m: int, new: "_Moments", sel: Tensor | None = None) -> None:
        """Write ``new`` into the first m entries (where ``sel``, if given)."""
        for x, y in zip(self, new):
            x[:m] = y if sel is None else torch.where(sel, y, x[:m])

    @staticmethod
    def powers(maps: "list[_Moments]", exps: list[Tensor], key: Tensor) -> "list[_Moments]":
        """Each map raised to its per-device exponent by repeated squaring. The devices are sorted by
        ``key`` ≥ every exponent, descending, so bit j only touches the prefix with key ≥ 2^j."""
        one, zero = torch.ones_like(key, dtype=F64), torch.zeros_like(key, dtype=F64)
        outs = [_Moments(zero.clone(), one.clone(), zero.clone(), zero.clone(), one.clone()) for _ in maps]
        bases = [_Moments(*(x.clone() for x in mp)) for mp in maps]
        top = int(key[0]) if key.numel() else 0
        prefix = [int((key >= (1 << j)).sum()) for j in range(top.bit_length() + 1)]
        for j in range(top.bit_length()):
            m, m_next = prefix[j], prefix[j + 1]
            for out, base, e in zip(outs, bases, exps):
                b = base.head(m)
                out.put(m, out.head(m).then(b), ((e[:m] >> j) & 1).bool())
                if m_next:
                    bn = base.head(m_next)
                    base.put(m_next, bn.then(bn))
        return outs


@dataclass(frozen=True, kw_only=True)
class CrossbarDevice(Device):
    """A resistive crossbar with a differential pair per weight (see the module docstring)."""

    kind: ClassVar[str] = "crossbar"
    name: str = "crossbar"
    g_min_uS: float = 0.0
    g_max_uS: float = 25.0
    # pulse response
    response: str = "linear"
    levels: int = 0  # programmable states = pulse positions 0 … levels−1 (P = levels − 1 pulses across the range); 0: continuous
    levels_down: int = 0  # position models: states along the depression curve (0: as levels)
    dw_min_uS: float = 0.0  # nominal step when levels = 0 (0: range/1000)
    nl_ltp: float = 0.0  # NeuroSim nonlinearity labels (response='exponential')
    nl_ltd: float = 0.0
    gamma_up: float = 1.0  # linear_step slopes / pow_step exponents (soft_bounds: 1)
    gamma_down: float = 1.0
    step_ref_frac: float = 0.5  # linear_step / soft_bounds: G_ref = g_min + step_ref_frac·R (nominal R), where ΔG↑ = ΔG↓ = dw_min
    table_file: str = ""  # response='table': the CSV beside the card
    table: ResponseTable | None = field(default=None, repr=False, compare=False)
    up_down_asym: float = 0.0
    up_down_dtod: float = 0.0
    dw_dtod: float = 0.0
    g_dtod: float = 0.0
    c2c_model: str = "additive"
    dw_ctoc: float = 0.0
    update_mode: str = "bidirectional"
    refresh_upper: float = 0.75
    refresh_lower: float = 0.25
    stuck_on_rate: float = 0.0
    stuck_off_rate: float = 0.0
    # programming
    prog_noise_model: str = "none"
    prog_noise: float = 0.0  # 'relative': σ/R; 'pcm': scale of the polynomial
    prog_coeffs_uS: tuple[float, float, float] = (0.26348, 1.9650, -1.1731)
    prog_ref_g_max_uS: float = 25.0
    # reading
    read_noise_model: str = "constant"
    read_noise: float = 0.0  # 'constant': σ per read per device / R; 'pcm': scale of the 1/f model
    t_read_s: float = 1e-7  # read duration: the 1/f band's upper cutoff and the read energy
    v_read_V: float = 0.2
    input_coding: str = "pulse_width"
    drift_model: str = "constant"
    drift_nu_mean: float = 0.0
    drift_nu_std: float = 0.0
    drift_t0_s: float = 20.0
    ir_drop: float = 0.0
    # write electrical parameters (0: not modelled; the card's e_pulse_J is used)
    v_write_up_V: float = 0.0
    v_write_down_V: float = 0.0
    t_write_up_s: float = 0.0
    t_write_down_s: float = 0.0
    c_write_F: float = 0.0
    t_step_s: float = 1e-3  # device time per training step (drift clock)
    # simulation (not physics): pulses one at a time, or k pulses at once by their exact moments
    pulse_application: str = "per_pulse"

    def __post_init__(self):
        check_range("g_min_uS", self.g_min_uS, lo=0.0)
        check_range("g_max_uS", self.g_max_uS, lo=self.g_min_uS, lo_open=True)
        for name in ("levels", "levels_down"):
            check_range(name, getattr(self, name), lo=0, hi=1 << 20, integer=True)
            if getattr(self, name) == 1:
                raise ConfigError(f"{name}=1 is out of range: a device needs 0 (continuous) or at least 2 levels")
        for name, valid in (("prog_noise_model", PROG_NOISE_MODELS), ("response", RESPONSES), ("update_mode", UPDATE_MODES),
                            ("read_noise_model", READ_NOISE_MODELS), ("drift_model", DRIFT_MODELS),
                            ("c2c_model", C2C_MODELS), ("input_coding", INPUT_CODINGS),
                            ("pulse_application", PULSE_APPLICATIONS)):
            if getattr(self, name) not in valid:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not valid; choose one of: {', '.join(valid)}")
        for name in ("prog_noise", "read_noise", "drift_nu_mean", "drift_nu_std", "g_dtod", "dw_dtod", "dw_ctoc", "ir_drop",
                     "up_down_dtod", "gamma_up", "gamma_down"):
            check_range(name, getattr(self, name), lo=0.0, hi=10.0)
        for name in ("stuck_on_rate", "stuck_off_rate", "refresh_upper", "refresh_lower"):
            check_range(name, getattr(self, name), lo=0.0, hi=1.0)
        if self.stuck_on_rate + self.stuck_off_rate > 1:
            raise ConfigError("stuck_on_rate + stuck_off_rate must not exceed 1")
        check_range("drift_t0_s", self.drift_t0_s, lo=0.0, lo_open=True)
        check_range("t_step_s", self.t_step_s, lo=0.0)
        check_range("t_read_s", self.t_read_s, lo=0.0, lo_open=True, hi=1.0)
        check_range("v_read_V", self.v_read_V, lo=0.0, hi=100.0)
        for name in ("v_write_up_V", "v_write_down_V"):
            check_range(name, getattr(self, name), lo=0.0, hi=100.0)
        for name in ("t_write_up_s", "t_write_down_s"):
            check_range(name, getattr(self, name), lo=0.0, hi=1.0)
        check_range("c_write_F", self.c_write_F, lo=0.0, hi=1e-6)
        check_range("dw_min_uS", self.dw_min_uS, lo=0.0, hi=self.g_max_uS - self.g_min_uS)
        check_range("up_down_asym", self.up_down_asym, lo=-1.99, hi=1.99)
        for name in ("nl_ltp", "nl_ltd"):
            check_range(name, getattr(self, name), lo=-9.0, hi=9.0)
        bi = self.update_mode == "bidirectional"
        check_range("step_ref_frac", self.step_ref_frac, lo=0.0, lo_open=bi, hi=1.0)
        if self.step_ref_frac >= 1.0:
            raise ConfigError(f"step_ref_frac={self.step_ref_frac!r} is out of range: expected a number in [0, 1) "
                              "(the fraction of the range above g_min where the nominal up and down steps are equal)")
        check_range("prog_ref_g_max_uS", self.prog_ref_g_max_uS, lo=0.0, lo_open=True)
        if len(self.prog_coeffs_uS) != 3:
            raise ConfigError(f"prog_coeffs_uS must hold 3 coefficients (c0, c1, c2 in µS), got {list(self.prog_coeffs_uS)}")
        if self.response == "table":
            t = self.table
            if t is None:
                raise ConfigError("response='table' needs a measured table: set table_file to a CSV beside the card "
                                  "(columns curve, direction, pulse, g_uS; see docs/devices.md)")
            if not t.up or len(t.up) != len(t.down) or any(len(c) < 2 for c in (*t.up, *t.down)):
                raise ConfigError("the response table needs, per measured curve, an 'up' and a 'down' curve of ≥ 2 points")
            lo, hi = min(min(c) for c in (*t.up, *t.down)), max(max(c) for c in (*t.up, *t.down))
            slack = 0.25 * (self.g_max_uS - self.g_min_uS)
            if lo < self.g_min_uS - slack or hi > self.g_max_uS + slack:
                raise ConfigError(f"the response table spans {lo:.4g}–{hi:.4g} µS, outside the card's range "
                                  f"{self.g_min_uS:.4g}–{self.g_max_uS:.4g} µS; set g_min_uS / g_max_uS to the measured range")

    # ------------------------------------------------------------------ maps
    @property
    def g_range(self) -> float:
        return self.g_max_uS - self.g_min_uS

    @property
    def dg(self) -> float:
        """Nominal step Δg (µS) of the step models (the spacing of ``levels`` states when set)."""
        if self.levels:
            return self.g_range / (self.levels - 1)
        return self.dw_min_uS or self.g_range / 1000.0

    def _axis(self, up: bool) -> tuple[float, float]:
        """(P, position advance of a nominal pulse) of the position models' up / down curve."""
        if self.response == "table":
            p_table = len(self.table.up[0] if up else self.table.down[0]) - 1
            lv = self.levels if up else (self.levels_down or self.levels)
            return float(p_table), (p_table / (lv - 1) if lv else 1.0)
        lv = self.levels if up else (self.levels_down or self.levels)
        p = float(lv - 1) if lv else self.g_range / (self.dw_min_uS or self.g_range / 1000.0)
        return p, 1.0

    def to_physical(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Target (G⁺, G⁻) in µS for normalised weights w̃ (before programming)."""
        w = w.clamp(-1.0, 1.0)
        if self.update_mode == "unidirectional":  # one device at g_min: room to potentiate
            return self.g_min_uS + w.clamp(min=0) * self.g_range, self.g_min_uS + (-w).clamp(min=0) * self.g_range
        # bidirectional: both devices at the centre c = G* (:attr:`g_center`) for w̃ = 0, where one
        # pulse moves the pair by dw_pulse; |w̃| is split between the devices in proportion to
        # their room on that side, so w̃ = ±1 still reaches (g_max, g_min) / (g_min, g_max)
        c = self.g_center
        up, down = self.g_max_uS - c, c - self.g_min_uS  # room above / below the centre
        pos, neg = w.clamp(min=0.0), w.clamp(max=0.0)
        return c + pos * up + neg * down, c - pos * down - neg * up

    def to_logical(self, gp: Tensor, gm: Tensor) -> Tensor:
        return (gp - gm) / self.g_range

    # ------------------------------------------------------------------ state
    def init_state(self, shape, generator, dtype, device) -> CrossbarState:
        dev = generator.device  # drawn where the generator lives (the tile's device)
        def randn():
            return torch.randn(shape, generator=generator, dtype=F64, device=dev).to(dtype)

        def stuck():
            u = torch.rand(shape, generator=generator, dtype=F64, device=dev)
            out = torch.zeros(shape, dtype=torch.int8, device=dev)
            out[u < self.stuck_on_rate] = 1
            out[(u >= self.stuck_on_rate) & (u < self.stuck_on_rate + self.stuck_off_rate)] = -1
            return out

        def gmax():
            return (self.g_min_uS + self.g_range * (1.0 + self.g_dtod * randn())).clamp(min=self.g_min_uS + 1e-6 * self.g_range)

        def dw():
            return (1.0 + self.dw_dtod * randn()).clamp(min=0.0)

        def nu():
            if self.drift_model == "pcm":  # drawn at every write, at the write's target conductance
                return torch.zeros(shape, dtype=dtype, device=dev)
            return (self.drift_nu_mean + self.drift_nu_std * randn()).clamp(min=0.0)

        def ud():
            return self.up_down_dtod * randn()

        def curve():
            n = self.table.curves if self.table is not None else 1
            return torch.randint(0, n, shape, generator=generator, dtype=torch.int64, device=dev)

        gmin = torch.full(shape, self.g_min_uS, dtype=dtype, device=dev)
        zeros = torch.zeros(shape, dtype=dtype, device=dev)
        st = CrossbarState(gmin.clone(), gmin.clone(), gmax(), gmax(), dw(), dw(), stuck(), stuck(), nu(), nu(),
                           zeros.clone(), zeros.clone(), 0.0, ud(), ud(), curve(), curve())
        st = st._replace(gp=self._pin(st.gp, st.stuck_p, st.gmax_p), gm=self._pin(st.gm, st.stuck_m, st.gmax_m))
        return CrossbarState(*[t.to(device) if isinstance(t, Tensor) else t for t in st])

    def _state(self, st: CrossbarState) -> CrossbarState:
        """Fill the fields a state saved before they existed lacks (ud, curve)."""
        if st.ud_p is None:
            z = torch.zeros_like(st.gp)
            c = torch.zeros(st.gp.shape, dtype=torch.int64, device=st.gp.device)
            st = st._replace(ud_p=z, ud_m=z.clone(), curve_p=c, curve_m=c.clone())
        return st

    def _pin(self, g: Tensor, stuck: Tensor, gmax: Tensor) -> Tensor:
        """Stuck devices hold their stuck value whatever was written."""
        g = torch.where(stuck > 0, gmax, g)
        return torch.where(stuck < 0, torch.full_like(g, self.g_min_uS), g)

    # ------------------------------------------------------------------ programming
    def prog_sigma(self, g: Tensor) -> Tensor | float:
        """Programming noise σ (µS) at target conductance g."""
        if self.prog_noise_model == "none" or self.prog_noise == 0:
            return 0.0
        if self.prog_noise_model == "relative":
            return self.prog_noise * self.g_range
        c0, c1, c2 = self.prog_coeffs_uS
        x = g / self.g_max_uS
        return self.prog_noise * (c0 + c1 * x + c2 * x * x) * (self.g_max_uS / self.prog_ref_g_max_uS)

    def _quantise(self, target: Tensor, gmax: Tensor, curve: Tensor | None) -> Tensor:
        """The programmable state nearest the target: a pulse position G_up(k) of the device's
        potentiation curve (position models), or a point of the uniform grid of ``levels``."""
        if self.response in POSITION_RESPONSES:
            if not self.levels and self.response != "table":
                return target
            g = target.reshape(-1)
            q = self._prep(_Dev(gmax.reshape(-1), torch.ones_like(g), torch.zeros_like(g),
                                None if curve is None else curve.reshape(-1)))
            x = self._position(g, q, up=True)
            _, s = self._axis(True)
            return self._at_position((x / s).round() * s, q, up=True).reshape(target.shape)
        if not self.levels:
            return target
        dg = self.dg
        return torch.minimum(((target - self.g_min_uS) / dg).round() * dg + self.g_min_uS, gmax)

    def _write(self, target: Tensor, gmax: Tensor, stuck: Tensor, curve: Tensor | None, gen) -> tuple[Tensor, Tensor]:
        """(programmed G, the write-verify target it was aimed at: in range and on the device's
        programmable states, before the programming noise)."""
        aim = self._quantise(torch.minimum(target.clamp(min=self.g_min_uS), gmax), gmax, curve)
        g = aim
        sig = self.prog_sigma(aim)
        if not (isinstance(sig, float) and sig == 0.0):
            g = g + sig * torch.randn(g.shape, generator=gen, dtype=F64, device=gen.device).to(g.dtype)
        g = g.clamp(min=self.g_min_uS)
        if self.prog_noise_model != "pcm":  # a device cannot be programmed past its own maximum
            g = torch.minimum(g, gmax)
        return self._pin(g, stuck, gmax), self._pin(aim, stuck, gmax)

    def _new_nu(self, g: Tensor, old: Tensor, written: Tensor | None, gen) -> Tensor:
        """PCM drift: every write draws ν = |N(μ(g), σ(g))| at g, the conductance the write aimed
        at — the programming target (aihwkit ``PCMLikeNoiseModel``: ``generate_drift_coefficients``
        of ``g_target``, independent of the programming noise), or, for a pulse, the conductance
        the pulse left (a pulse has no target). ``written``: the cells written (None: all); only
        those draw, so a sparse update costs what it writes."""
        if self.drift_model != "pcm":
            return old
        if written is None:
            gi = g
        else:
            idx = written.reshape(-1).nonzero().squeeze(1)
            if idx.numel() == 0:
                return old
            gi = g.reshape(-1)[idx]
        mu, sd = pcm_drift_nu(gi / self.g_max_uS)
        xi = torch.randn(gi.shape, generator=gen, dtype=F64, device=gen.device).to(g.dtype)
        nu = (mu + sd * xi).abs().to(old.dtype)
        if written is None:
            return nu
        return old.reshape(-1).index_copy(0, idx, nu).reshape(old.shape)

    def program(self, state: CrossbarState, w: Tensor, generator) -> CrossbarState:
        state = self._state(state)
        tp, tm = self.to_physical(w)
        gp, aim_p = self._write(tp, state.gmax_p, state.stuck_p, state.curve_p, generator)
        gm, aim_m = self._write(tm, state.gmax_m, state.stuck_m, state.curve_m, generator)
        now = torch.full_like(gp, state.t_now)
        return state._replace(gp=gp, gm=gm, tprog_p=now, tprog_m=now.clone(),
                              nu_p=self._new_nu(aim_p, state.nu_p, None, generator),
                              nu_m=self._new_nu(aim_m, state.nu_m, None, generator))

    # ------------------------------------------------------------------ reading
    def _drifted(self, g: Tensor, nu: Tensor, tprog: Tensor, t_now: float) -> Tensor:
        if self.drift_model == "constant" and self.drift_nu_mean == 0 and self.drift_nu_std == 0:
            return g
        t0 = self.drift_t0_s
        return g * ((t_now - tprog + t0) / t0).pow(-nu)

    def conductances(self, state: CrossbarState) -> tuple[Tensor, Tensor]:
        """(G⁺, G⁻) in µS now (drift applied)."""
        return (self._drifted(state.gp, state.nu_p, state.tprog_p, state.t_now),
                self._drifted(state.gm, state.nu_m, state.tprog_m, state.t_now))

    def mean(self, state: CrossbarState) -> Tensor:
        gp, gm = self.conductances(state)
        w = (gp - gm) / self.g_range
        if self.ir_drop and w.shape[1] > 1:
            pos = torch.linspace(0.0, 1.0, w.shape[1], dtype=w.dtype, device=w.device)
            w = w * (1.0 - self.ir_drop * pos)
        return w

    def device_read_sigma(self, g_prog: Tensor, g_now: Tensor, t_since_prog: Tensor) -> Tensor | float:
        """σ (µS) of one read of a device programmed to g_prog, at g_now, t_since_prog after its write."""
        if self.read_noise_model == "constant":
            return self.read_noise * self.g_range
        t = t_since_prog + self.drift_t0_s
        band = torch.log((t + self.t_read_s) / (2.0 * self.t_read_s)).clamp(min=0.0).sqrt()
        return self.read_noise * g_now.abs() * pcm_read_qs(g_prog / self.g_max_uS) * band

    def read_std(self, state) -> float | Tensor | None:
        if self.read_noise == 0:
            return None
        if self.read_noise_model == "constant":
            # two independent devices per weight: Var(w̃) = 2 σ² / R², σ = read_noise · R
            return math.sqrt(2.0) * self.read_noise
        gp, gm = self.conductances(state)
        sp = self.device_read_sigma(state.gp, gp, state.t_now - state.tprog_p)
        sm = self.device_read_sigma(state.gm, gm, state.t_now - state.tprog_m)
        return (sp.square() + sm.square()).sqrt() / self.g_range

    def advance(self, state: CrossbarState, seconds: float) -> CrossbarState:
        return state._replace(t_now=state.t_now + float(seconds))

    def physical(self, state: CrossbarState) -> dict[str, tuple[Tensor, str]]:
        gp, gm = self.conductances(state)
        return {"g_plus": (gp, "uS"), "g_minus": (gm, "uS")}

    def read_energy_lines(self, state: CrossbarState, transpose: bool) -> Tensor:
        gp, gm = self.conductances(state)
        total = (gp + gm).sum(dim=1 if transpose else 0)
        return total.mul_(self.v_read_V**2 * self.t_read_s * _US)

    @property
    def models_write_energy(self) -> bool:
        return (self.v_write_up_V > 0 and self.t_write_up_s > 0) or (self.v_write_down_V > 0 and self.t_write_down_s > 0) \
            or self.c_write_F > 0

    # ------------------------------------------------------------------ one pulse
    def _prep(self, p: _Dev) -> _Pre:
        """Per-device constants of the response (computed once per call, sliced per pulse)."""
        a = self.up_down_asym
        lo = self.g_min_uS
        rng = p.gmax - lo
        su = (p.dwf * (1.0 + a / 2 + p.ud)).clamp(min=0.0)  # step factors s↑, s↓
        sd = (p.dwf * (1.0 - a / 2 - p.ud)).clamp(min=0.0)
        r = self.response
        none = None
        if r in POSITION_RESPONSES:
            su, sd = su * self._axis(True)[1], sd * self._axis(False)[1]  # in positions of the curve
            bu = bd = none
            if r == "exponential":
                _, _, bu = self._exp_params(True, rng)
                _, _, bd = self._exp_params(False, rng)
            return _Pre(p.gmax, rng, su, sd, none, none, none, none, bu, bd, p.curve)
        su, sd = su * self.dg, sd * self.dg  # in µS
        if r == "pow_step":
            return _Pre(p.gmax, rng, su, sd, none, none, none, none, none, none, p.curve)
        # G_ref (aihwkit's w = 0) is the same for every device: the card's nominal one. linear_step
        # divides by the nominal bounds (aihwkit ls_mean_bound_reference = True, its default);
        # soft_bounds by each device's own g_max, so its step vanishes at that device's bound
        ref = self.g_ref
        if r == "soft_bounds":
            ku = su / (p.gmax - ref).clamp(min=1e-12)  # ΔG↑ = (cu − ku·G)⁺
        else:
            ku = su * (self.gamma_up / max(self.g_max_uS - ref, 1e-12))
        gd = 1.0 if r == "soft_bounds" else self.gamma_down
        kd = sd * (gd / max(ref - lo, 1e-12))  # |ΔG↓| = (cd + kd·G)⁺
        return _Pre(p.gmax, rng, su, sd, su + ku * ref, ku, sd - kd * ref, kd, none, none, p.curve)

    def _exp_params(self, up: bool, rng: Tensor) -> tuple[float, float, Tensor | None]:
        """(P, A, B) of NeuroSim's curve for one direction on devices of range ``rng`` (µS)."""
        p, _ = self._axis(up)
        nl = self.nl_ltp if up else self.nl_ltd
        a = neurosim_a(nl)
        if math.isinf(a):
            return p, math.inf, None
        A = math.copysign(a, nl) * p
        return p, A, rng / (-math.expm1(-p / A))

    def _position(self, g: Tensor, q: _Pre, up: bool) -> Tensor:
        """Pulse position x of conductance g on the device's up (or down) curve."""
        lo = self.g_min_uS
        dg = torch.minimum((g - lo).clamp(min=0.0), q.rng)
        if self.response == "table":
            ups, downs = _table_tensors(self.table, lo, self.g_range, g.device, g.dtype)
            curves = ups if up else downs
            gn = dg / q.rng  # the device's range scales the measured curve (normalised by the card's)
            out = torch.empty_like(g)
            for c in range(curves.shape[0]):
                sel = q.curve == c if curves.shape[0] > 1 else slice(None)
                out[sel] = _inverse(curves[c], gn[sel])
            return out
        P, A, _ = self._exp_params(up, q.rng[:1])
        B = q.bu if up else q.bd
        if B is None:  # linear
            return dg / q.rng * P
        return -A * torch.log1p(-dg / B)  # x = −A ln(1 − (G − g_min)/B), NeuroSim's InvNonlinearWeight

    def _at_position(self, x: Tensor, q: _Pre, up: bool) -> Tensor:
        """Conductance at pulse position x of the device's up (or down) curve."""
        lo = self.g_min_uS
        if self.response == "table":
            ups, downs = _table_tensors(self.table, lo, self.g_range, x.device, x.dtype)
            curves = ups if up else downs
            out = torch.empty_like(x)
            for c in range(curves.shape[0]):
                sel = q.curve == c if curves.shape[0] > 1 else slice(None)
                out[sel] = _interp(curves[c], x[sel])
            return lo + q.rng * out
        P, A, _ = self._exp_params(up, q.rng[:1])
        x = x.clamp(0.0, P)
        B = q.bu if up else q.bd
        if B is None:
            return lo + q.rng * (x / P)
        return lo - B * torch.expm1(-x / A)  # G = g_min + B (1 − e^(−x/A)), NeuroSim's NonlinearWeight

    def _next(self, g: Tensor, q: _Pre, up: bool) -> Tensor:
        """Expected conductance after one pulse (no cycle-to-cycle noise), before clipping."""
        r = self.response
        if r in POSITION_RESPONSES:
            x = self._position(g, q, up)
            # a device above the top of its potentiation curve (or below the bottom of its depression
            # curve) does not move back: a pulse never moves against its direction
            if up:
                return torch.maximum(self._at_position(x + q.su, q, True), g)
            return torch.minimum(self._at_position(x - q.sd, q, False), g)
        if r == "pow_step":
            omega = ((q.gmax - g) / q.rng).clamp(0.0, 1.0)
            return g + q.su * omega.pow(self.gamma_up) if up else g - q.sd * (1.0 - omega).pow(self.gamma_down)
        if up:
            return g + torch.addcmul(q.cu, q.ku, g, value=-1.0).clamp_(min=0.0)
        return g - torch.addcmul(q.cd, q.kd, g).clamp_(min=0.0)

    def _sigma(self, step: Tensor, q: _Pre, up: bool) -> Tensor:
        """Standard deviation (µS) of one pulse's cycle-to-cycle noise, given its mean step."""
        if self.c2c_model == "multiplicative":
            return self.dw_ctoc * step.abs()
        if self.c2c_model == "range":
            return self.dw_ctoc * q.rng
        s = q.su if up else q.sd
        if self.response in POSITION_RESPONSES:
            return self.dw_ctoc * s * q.rng / self._axis(up)[0]
        return self.dw_ctoc * s

    def pulse(self, g: Tensor, up: bool | Tensor, q: _Pre, gen: torch.Generator) -> Tensor:
        """One pulse on every device of a flat batch (``up``: one direction for all, or a bool
        tensor per device), with cycle-to-cycle noise, clipped to each device's range."""
        if isinstance(up, bool):
            step = self._next(g, q, up) - g
            sig = self._sigma(step, q, up) if self.dw_ctoc else None
        else:
            s_up, s_dn = self._next(g, q, True) - g, self._next(g, q, False) - g
            step = torch.where(up, s_up, s_dn)
            sig = torch.where(up, self._sigma(s_up, q, True), self._sigma(s_dn, q, False)) if self.dw_ctoc else None
        if sig is not None:
            step = step.addcmul_(sig, torch.randn(g.shape, generator=gen, dtype=F64, device=gen.device).to(g.dtype))
        return torch.minimum((g + step).clamp_(min=self.g_min_uS), q.gmax)

    # ------------------------------------------------------------------ pulses on the array
    def _flat(self, state: CrossbarState, dtype) -> tuple[Tensor, _Dev, Tensor]:
        """All devices of the array as one flat batch: G⁺ cells, then G⁻ cells."""
        st = self._state(state)

        def cat(a, b, dt=dtype):
            return torch.cat([a.reshape(-1), b.reshape(-1)]).to(dt)

        p = _Dev(cat(st.gmax_p, st.gmax_m), cat(st.dw_p, st.dw_m), cat(st.ud_p, st.ud_m), cat(st.curve_p, st.curve_m, torch.int64))
        return cat(st.gp, st.gm), p, cat(st.stuck_p, st.stuck_m, torch.int8) == 0

    def _pulse_energy(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """Per direction (up, down): the write energy per pulse as (J per µS of the mean conductance
        during the pulse, V²·t: a resistive cell; J per pulse, V²·C: a gate), NeuroSim's writeEnergy."""
        return ((self.v_write_up_V**2 * self.t_write_up_s * _US, self.v_write_up_V**2 * self.c_write_F),
                (self.v_write_down_V**2 * self.t_write_down_s * _US, self.v_write_down_V**2 * self.c_write_F))

    def _run(self, g: Tensor, q: _Pre, free: Tensor, n_up: Tensor, n_dn: Tensor, first_up: Tensor | None,
             direction: bool | None, gen) -> tuple[Tensor, Tensor]:
        """Pulse a group of devices sorted by their pulse count (descending): pulse k acts on the
        prefix of devices with more than k pulses. ``direction``: the group's one direction, or
        None for devices taking both (interleaved, ``first_up`` first). Returns (G, energy J)."""
        total = n_up + n_dn
        hist = torch.bincount(total.long()).tolist()  # one host sync per group
        energy = torch.zeros((), dtype=F64, device=g.device)
        track = self.models_write_energy
        e_up, e_dn = self._pulse_energy()
        m = total.numel()
        for k in range(len(hist) - 1):
            m -= hist[k]
            g0, qk, fk = g[:m], q.slice(m), free[:m]
            if direction is None:
                u, d, f = n_up[:m], n_dn[:m], first_up[:m]
                up = torch.where(k < 2 * torch.minimum(u, d), f if k % 2 == 0 else ~f, u > d)
            else:
                up = direction
            g1 = torch.where(fk, self.pulse(g0, up, qk, gen), g0)
            if track:  # V²·t·(G_before + G_after)/2 + V²·C per pulse (NeuroSim writeEnergy)
                mid = (g0 + g1).mul_(0.5)
                if isinstance(up, bool):
                    e = mid.sum() * (e_up if up else e_dn)[0] + m * (e_up if up else e_dn)[1]
                else:
                    e = torch.where(up, mid * e_up[0] + e_up[1], mid * e_dn[0] + e_dn[1]).sum()
                energy = energy + e
            g[:m] = g1
        return g, energy

    def apply_pulses(self, state: CrossbarState, n_up: Tensor, n_down: Tensor, generator) -> tuple[CrossbarState, UpdateCounts]:
        """Apply ``n_up`` weight-up and ``n_down`` weight-down pulses to each weight (non-negative
        integer-valued tensors of the weight shape, e.g. coincidences of row and column pulse
        trains). Each pulse acts on the cells of the pair as the update mode says (bidirectional:
        up on G⁺ and down on G⁻ for a weight-up pulse; unidirectional: up on G⁺, or on G⁻ for a
        weight-down pulse), with the device's response at its present conductance,
        cycle-to-cycle noise drawn per pulse, its device-to-device step factors, the bounds, and
        stuck cells that never move. Pulses are applied one at a time (up and down interleaved,
        up first), so n pulses in one call are exactly n single-pulse calls in distribution.
        Unidirectional pairs are refreshed afterwards (see the module docstring).
        Returns the new state and the counts: device pulses up and down (0-dim tensors), pairs
        refreshed, and the pulses' energy ``write_J`` where the card gives the write voltages."""
        state = self._state(state)
        shape = state.gp.shape
        if tuple(n_up.shape) != tuple(shape) or tuple(n_down.shape) != tuple(shape):
            raise DeviceError(f"apply_pulses: n_up {tuple(n_up.shape)} and n_down {tuple(n_down.shape)} must have the "
                              f"weight shape {tuple(shape)}")
        dtype = state.gp.dtype
        nu_, nd_ = n_up.to(dtype).round().reshape(-1), n_down.to(dtype).round().reshape(-1)
        if bool((nu_ < 0).any() | (nd_ < 0).any()):
            raise DeviceError("apply_pulses: pulse counts must be non-negative (n_up moves the weight up, n_down down)")
        bi = self.update_mode == "bidirectional"
        dev_up = torch.cat([nu_, nd_])  # device pulses: G⁺ cells then G⁻ cells
        dev_dn = torch.cat([nd_, nu_]) if bi else torch.zeros_like(dev_up)
        g, p, free = self._flat(state, dtype)
        n = shape.numel()
        energy = torch.zeros((), dtype=F64, device=g.device)
        # three groups sorted by pulse count: only up, only down, both (interleaved)
        only_up, only_dn = (dev_up > 0) & (dev_dn == 0), (dev_dn > 0) & (dev_up == 0)
        both = (dev_up > 0) & (dev_dn > 0)
        if self.applies_moments:  # long sequences by their moments, short ones pulse by pulse
            many = (dev_up + dev_dn) > MOMENTS_MIN_PULSES
            g, energy, done = self._apply_moments(g, p, free, dev_up, dev_dn, many, n, generator)
            only_up, only_dn, both = only_up & ~done, only_dn & ~done, both & ~done
        for mask, direction in ((only_up, True), (only_dn, False), (both, None)):
            idx = mask.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            total = (dev_up + dev_dn)[idx]
            if bool((total > 1).any()):  # one pulse each needs no order
                idx = idx[torch.argsort(total, descending=True)]
            q = self._prep(_Dev(p.gmax[idx], p.dwf[idx], p.ud[idx], p.curve[idx]))
            first = None
            if direction is None:
                first = torch.cat([torch.ones(n, dtype=torch.bool, device=g.device),
                                   torch.zeros(n, dtype=torch.bool, device=g.device)])[idx]
            gi, e = self._run(g[idx], q, free[idx], dev_up[idx], dev_dn[idx], first, direction, generator)
            g = g.index_copy(0, idx, gi)
            energy = energy + e
        gp, gm = g[:n].reshape(shape), g[n:].reshape(shape)
        pulsed_p = ((dev_up[:n] + dev_dn[:n]) > 0).reshape(shape) & (state.stuck_p == 0)
        pulsed_m = ((dev_up[n:] + dev_dn[n:]) > 0).reshape(shape) & (state.stuck_m == 0)
        now = state.t_now
        new = state._replace(
            gp=gp, gm=gm,
            tprog_p=torch.where(pulsed_p, torch.full_like(gp, now), state.tprog_p),
            tprog_m=torch.where(pulsed_m, torch.full_like(gm, now), state.tprog_m),
            nu_p=self._new_nu(gp, state.nu_p, pulsed_p, generator), nu_m=self._new_nu(gm, state.nu_m, pulsed_m, generator))
        refreshes = torch.zeros((), dtype=torch.int64, device=gp.device)
        if not bi:
            new, refreshes = self._refresh(new, generator)
        return new, UpdateCounts(dev_up.sum(), dev_dn.sum(), refreshes, 0, energy)

    remappable: ClassVar[bool] = True

    @property
    def weight_limit(self) -> float:
        """A pair holds w̃ ∈ [−1, 1] (one device at g_max, the other at g_min)."""
        return 1.0

    @property
    def applies_moments(self) -> bool:
        """Whether :meth:`apply_pulses` takes each device's k pulses at once by their moments
        (``pulse_application = "moments"`` on a response whose step is affine in G inside the
        range: soft bounds, NeuroSim's linear and exponential curves, or a linear step whose slopes
        γ ≤ 1 keep it positive there)."""
        if self.pulse_application != "moments" or self.response not in AFFINE_RESPONSES:
            return False
        return self.response != "linear_step" or (self.gamma_up <= 1.0 and self.gamma_down <= 1.0)

    def _pulse_moments(self, q: _Pre, g0: Tensor, up: bool) -> _Moments:
        """One pulse as the moment map on y = G − g0: y' = a + b·y + (α + γ·y)·ξ."""
        s = q.su if up else q.sd
        if self.response in POSITION_RESPONSES:  # linear / exponential: x → x ± s on the curve G_d(x)
            P, A, _ = self._exp_params(up, q.rng[:1])
            B = q.bu if up else q.bd
            if B is None:  # linear: a step of s·R/P
                b = torch.ones_like(g0, dtype=F64)
                a = (s * q.rng / P).to(F64) * (1.0 if up else -1.0)
            else:  # G' = (g_min + B)(1 − b) + b·G, b = e^(∓s/A); on y = G − g0: a = (g_min + B − g0)(1 − b)
                b = torch.exp(-s.to(F64) / A) if up else torch.exp(s.to(F64) / A)
                a = (self.g_min_uS + B.to(F64) - g0) * (1.0 - b)
        elif up:
            a, b = q.cu - q.ku * g0, 1.0 - q.ku
        else:
            a, b = -(q.cd + q.kd * g0), 1.0 - q.kd
        a, b = a.to(F64), torch.as_tensor(b, dtype=F64, device=g0.device).expand_as(a)
        sig = self.dw_ctoc
        zero = torch.zeros_like(a)
        if sig == 0.0:
            al, ga = zero, zero
        elif self.c2c_model == "multiplicative":  # σ·|ΔG|, ΔG = a + (b − 1)·y
            al, ga = sig * a, sig * (b - 1.0)
        elif self.c2c_model == "range":
            al, ga = (sig * q.rng).to(F64).expand_as(a), zero
        elif self.response in POSITION_RESPONSES:  # additive: σ·s positions of R/P each
            al, ga = (sig * s * q.rng / self._axis(up)[0]).to(F64).expand_as(a), zero
        else:  # additive: σ·s
            al, ga = (sig * s).to(F64).expand_as(a), zero
        return _Moments(a, b, a * a + al * al, 2.0 * (a * b + al * ga), b * b + ga * ga)

    def _apply_moments(self, g: Tensor, p: _Dev, free: Tensor, dev_up: Tensor, dev_dn: Tensor, sel: Tensor, n: int,
                       gen) -> tuple[Tensor, Tensor, Tensor]:
        """The whole sequence of every device in ``sel`` at once (see the module docstring, "Pulse
        application"): G⁺ cells take their pulses up first, G⁻ cells down first, as the
        per-pulse path interleaves them. Devices near a bound are left for the per-pulse path.
        Returns (G, write energy J, mask of the devices done here)."""
        idx = (sel & ((dev_up + dev_dn) > 0)).nonzero().squeeze(1)
        energy = torch.zeros((), dtype=F64, device=g.device)
        if idx.numel() == 0:
            return g, energy, torch.zeros_like(sel)
        u, d = dev_up[idx].long(), dev_dn[idx].long()
        k, r = torch.minimum(u, d), (u - d).abs()  # alternating pairs, then the majority direction
        key = torch.maximum(k, r)
        if bool((key > 1).any()):
            order = torch.argsort(key, descending=True)
            idx, u, d, k, r, key = idx[order], u[order], d[order], k[order], r[order], key[order]
        q = self._prep(_Dev(p.gmax[idx], p.dwf[idx], p.ud[idx], p.curve[idx]))
        g0 = g[idx].to(F64)
        first_up = idx < n  # G⁺ cells: up first
        U, D = self._pulse_moments(q, g0, True), self._pulse_moments(q, g0, False)
        pair = _Moments.where(first_up, U.then(D), D.then(U))
        rest = _Moments.where(u > d, U, D)
        pair_k, rest_r = _Moments.powers([pair, rest], [k, r], key)
        T = pair_k.then(rest_r)
        sd = (T.C0 - T.A * T.A).clamp(min=0.0).sqrt()  # y starts at 0: E[y] = A, E[y²] = C0
        m, hi = g0 + T.A, q.gmax.to(F64)
        # a device whose start or expected end lies within BOUND_SIGMAS standard deviations of a bound
        # would be clipped on the way (per pulse, not once at the end): it is pulsed one at a time
        inside = (torch.minimum(m, g0) - self.g_min_uS >= BOUND_SIGMAS * sd) & (hi - torch.maximum(m, g0) >= BOUND_SIGMAS * sd)
        done = torch.zeros_like(sel)
        if not bool(inside.any()):
            return g, energy, done
        idx, u, d, g0, m, sd, hi = (x[inside] for x in (idx, u, d, g0, m, sd, hi))
        xi = torch.randn(g0.shape, generator=gen, dtype=F64, device=gen.device).to(g0.device)
        g1 = torch.minimum((m + sd * xi).clamp(min=self.g_min_uS), hi)
        g1 = torch.where(free[idx], g1, g0)
        if self.models_write_energy:  # every pulse at the mean of the start and end conductances
            mid = (g0 + g1).mul_(0.5)
            e_up, e_dn = self._pulse_energy()
            energy = (u * (mid * e_up[0] + e_up[1]) + d * (mid * e_dn[0] + e_dn[1])).sum()
        done[idx] = True
        return g.index_copy(0, idx, g1.to(g.dtype)), energy, done

    def _refresh(self, st: CrossbarState, generator) -> tuple[CrossbarState, Tensor]:
        """Re-program pairs whose larger device is above ``refresh_upper`` of its range while the
        smaller is above ``refresh_lower`` (aihwkit OneSidedUnitCell): both are reset and the present
        weight is written again onto one device (with programming noise)."""
        lo = self.g_min_uS
        fp = (st.gp - lo) / (st.gmax_p - lo)
        fm = (st.gm - lo) / (st.gmax_m - lo)
        free = (st.stuck_p == 0) & (st.stuck_m == 0)
        sat = free & (torch.maximum(fp, fm) > self.refresh_upper) & (torch.minimum(fp, fm) > self.refresh_lower)
        count = sat.sum()
        if not bool(count > 0):
            return st, count
        # re-program only the refreshed pairs (a whole-array program() draws noise for every cell)
        idx = sat.reshape(-1).nonzero().squeeze(1)
        sub = CrossbarState(*[t.reshape(-1)[idx] if isinstance(t, Tensor) else t for t in st])
        r = self.program(sub, self.to_logical(sub.gp, sub.gm), generator)
        keep = {k: getattr(st, k).reshape(-1).index_copy(0, idx, getattr(r, k)).reshape(st.gp.shape)
                for k in ("gp", "gm", "nu_p", "nu_m", "tprog_p", "tprog_m")}
        return st._replace(**keep), count

    def update(self, state: CrossbarState, dw: Tensor, generator) -> tuple[CrossbarState, UpdateCounts]:
        """The host regime: an intended change Δw̃ becomes n = round(|Δw̃| / ``dw_pulse``) pulses in
        its direction, applied by :meth:`apply_pulses`."""
        n = (dw.abs() / self.dw_pulse).round()
        zero = torch.zeros_like(n)
        return self.apply_pulses(state, torch.where(dw > 0, n, zero), torch.where(dw < 0, n, zero), generator)

    # ------------------------------------------------------------------ symmetry
    def _h(self, g: Tensor, q: _Pre) -> Tensor:
        """Expected up step minus expected down step magnitude at g."""
        return self._next(g, q, True) + self._next(g, q, False) - 2.0 * g

    @staticmethod
    def _bisect(fn, q: _Pre, lo: Tensor, hi: Tensor, iters: int = 60) -> Tensor:
        """Where fn (decreasing through zero) crosses zero on [lo, hi]; the bound it drifts to if it
        does not change sign (lo when fn(lo) ≤ 0, hi when fn(hi) > 0)."""
        f_lo, f_hi = fn(lo, q), fn(hi, q)
        a, b = lo.clone(), hi.clone()
        for _ in range(iters):
            mid = 0.5 * (a + b)
            pos = fn(mid, q) > 0
            a, b = torch.where(pos, mid, a), torch.where(pos, b, mid)
        x = 0.5 * (a + b)
        x = torch.where(f_lo <= 0, lo, x)
        return torch.where((f_lo > 0) & (f_hi > 0), hi, x)

    def _g_star(self, q: _Pre, lo: Tensor, hi: Tensor) -> Tensor:
        """Each device's symmetry point: the middle of the interval where its expected up and down
        steps are equal (|h| ≤ 10⁻⁹·R), found as the two ends of that interval by bisection — one
        point for a curved response, the middle of the range where a ``linear`` device's steps are
        equal everywhere (away from the bounds)."""
        tol = 1e-9 * self.g_range

        def above(g, q):  # > 0 while the up step exceeds the down step
            return self._h(g, q) - tol

        def not_below(g, q):  # > 0 while the up step is at least the down step
            return self._h(g, q) + tol

        return 0.5 * (self._bisect(above, q, lo, hi) + self._bisect(not_below, q, lo, hi))

    @property
    def restores_to_symmetry_point(self) -> bool:
        """Whether alternating weight-up and weight-down pulses pull a nominal pair's weight to its
        symmetry point. Bidirectional: wherever a device's h(G) = E[up step] − E[|down step|] ≠ 0
        (more than 1.5 pulse steps and 5 % of the range from either bound), it drifts to its
        symmetry point (or to the bound its larger step points to, both devices alike, so
        w̃ → 0). Unidirectional: where the SET step depends on G, the difference of the two
        devices' steps depends on the weight. False for a symmetric linear device (and any whose
        expected steps are equal everywhere)."""
        lo, R = self.g_min_uS, self.g_range
        m = max(0.05, 1.5 * self.dw_pulse) * R  # away from the bounds by more than a step: a clipped step
        # near a bound is not a pull to a symmetry point (a 4-state device's step is a third of its range)
        g = torch.linspace(lo + m, lo + R - m, 33, dtype=F64) if 2 * m < R else torch.tensor([lo + 0.5 * R], dtype=F64)
        one = torch.ones_like(g)
        q = self._prep(_Dev(one * self.g_max_uS, one, one * 0.0, torch.zeros(g.shape, dtype=torch.int64)))
        up = self._next(g, q, True) - g
        tol = 1e-3 * float(up.abs().mean())
        if self.update_mode == "bidirectional":
            return bool(self._h(g, q).abs().max() > tol)
        return bool(up.max() - up.min() > tol)

    def symmetry_point(self, state: CrossbarState) -> Tensor:
        """Per weight, the w̃ at which an up and a down pulse have equal and opposite expected
        effect. Bidirectional pairs: each device at the conductance where its expected up and
        down steps are equal, w̃* = (G⁺* − G⁻*)/R — the point alternating up and down pulses drive
        the pair to (a device whose up step exceeds its down step everywhere drifts to its upper
        bound, and conversely). Unidirectional pairs: the less potentiated device stays; the other
        sits where its SET step equals the first's."""
        state = self._state(state)
        shape = state.gp.shape
        g, p, _ = self._flat(state, F64)
        n = shape.numel()
        if self.update_mode == "bidirectional":
            q = self._prep(p)
            gs = self._g_star(q, torch.full_like(g, self.g_min_uS), p.gmax.clone())
            return ((gs[:n] - gs[n:]) / self.g_range).reshape(shape).to(state.gp.dtype)
        gp, gm = g[:n], g[n:]
        plus_small = gp <= gm
        g_small = torch.where(plus_small, gp, gm)

        def pick(first: bool) -> _Dev:
            a, b = (slice(None, n), slice(n, None)) if first else (slice(n, None), slice(None, n))
            return _Dev(*(torch.where(plus_small, t[a], t[b]) for t in p))

        qs, qo = self._prep(pick(True)), self._prep(pick(False))
        target = self._next(g_small, qs, True) - g_small
        g_other = self._bisect(lambda x, q: self._next(x, q, True) - x - target, qo,
                               torch.full_like(g_small, self.g_min_uS), qo.gmax.clone())
        w = torch.where(plus_small, g_small - g_other, g_other - g_small) / self.g_range
        return w.reshape(shape).to(state.gp.dtype)

    @property
    def g_ref(self) -> float:
        """G_ref = g_min + step_ref_frac·R (µS) of the card's nominal range: aihwkit's w = 0 of the
        step models, the same for every device."""
        return self.g_min_uS + self.step_ref_frac * self.g_range

    @cached_property
    def _nominal(self) -> tuple[float, float]:
        """(G* µS, dw_pulse) of the nominal device, computed once per configuration."""
        one = torch.ones(1, dtype=F64)
        q = self._prep(_Dev(one * self.g_max_uS, one, one * 0.0, torch.zeros(1, dtype=torch.int64)))
        lo, hi = one * self.g_min_uS, one * self.g_max_uS
        if self.update_mode == "unidirectional":
            return self.g_min_uS, float((self._next(lo, q, True) - lo) / self.g_range)
        if bool((self._h(lo, q) <= 0) | (self._h(hi, q) > 0)):  # no crossing: take the mid-range steps
            g = 0.5 * (lo + hi)
        else:
            g = self._g_star(q, lo, hi)
        return float(g), float((self._next(g, q, True) - self._next(g, q, False)) / self.g_range)

    @property
    def g_center(self) -> float:
        """Conductance (µS) of both devices of a bidirectional pair at w̃ = 0: the nominal device's
        symmetry point G* (mid-range if its up and down steps are never equal), so that one pulse
        at w̃ = 0 moves the pair by :attr:`dw_pulse` (aihwkit: w = 0 is the symmetry point).
        Unidirectional pairs: g_min."""
        return self._nominal[0]

    @property
    def dw_pulse(self) -> float:
        """Nominal change of w̃ per weight pulse at the symmetry point of the nominal device (no
        device-to-device spread): bidirectional (ΔG↑ + ΔG↓)(G*)/R, G* where the nominal device's
        up and down steps are equal (mid-range if they never are) — where the mapping puts w̃ = 0
        (:attr:`g_center`); unidirectional ΔG↑(g_min)/R."""
        return self._nominal[1]

    # ------------------------------------------------------------------ the figure of a device paper
    def default_ramp(self, up: bool = True) -> int:
        """Pulses of a potentiation (or depression) ramp across the range: P for the position
        models, 2·R/Δg for the step models (a soft-bounded device approaches its bound slowly)."""
        if self.response in POSITION_RESPONSES:
            p, s = self._axis(up)
            return int(round(p / s))
        return int(math.ceil(2 * self.g_range / self.dg))

    def pulse_response(self, n_devices: int = 1000, n_up: int | None = None, n_down: int | None = None,
                       seed: int = 0) -> "PulseResponse":
        """Conductance (µS) of ``n_devices`` devices (their device-to-device spread sampled as in
        an array) after each of ``n_up`` potentiating pulses from g_min, then ``n_down``
        depressing pulses (none for unidirectional devices), with cycle-to-cycle noise."""
        n_up = self.default_ramp() if n_up is None else int(n_up)
        if n_down is None:
            n_down = 0 if self.update_mode == "unidirectional" else self.default_ramp(False)
        gen_ = torch.Generator().manual_seed(int(seed))
        st = self._state(self.init_state((n_devices,), gen_, F64, "cpu"))
        p = _Dev(st.gmax_p, st.dw_p, st.ud_p, st.curve_p)
        q = self._prep(p)
        free = st.stuck_p == 0
        g = torch.where(free, torch.full_like(st.gp, self.g_min_uS), st.gp)
        trace = [g.clone()]
        for k in range(n_up + n_down):
            g = torch.where(free, self.pulse(g, k < n_up, q, gen_), g)
            trace.append(g.clone())
        return PulseResponse(torch.stack(trace), n_up, n_down)


class PulseResponse(NamedTuple):
    """G (µS) after each pulse: ``g[k, d]`` for device d after k pulses (k ≤ n_up: potentiation)."""

    g: Tensor
    n_up: int
    n_down: int

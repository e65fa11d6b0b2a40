"""The settling engine: integrate ds/dt = f(s) to a steady state, per sample.

``f`` is the vector field of a *dynamics* object (for EP, the field of the layered Hopfield
network, see :mod:`mep_hw.model.hopfield`). Time is dimensionless, in units of the network's time
constant τ, so a device card can turn it into seconds. A sample stops when its steady-state test
holds (L2 norms over all of the sample's state components, N of them)::

    rms(f(s)) ≤ atol + rtol · rms(s)        with rms(v) = ‖v‖ / √N

Every dynamics declares ``noise_floor``, the rms of its field noise per component (0 for exact
weights; > 0 when read through noisy hardware); 2 × noise_floor is added to atol. A dynamics with
a box may instead declare ``noise_vars``, the noise variance per component of each layer: the
noise then counts only at the components strictly inside the box (a clipped component's field is
exactly 0, noise or not), and a sample's test is ‖f(s)‖ ≤ atol·√N + 2·√(Σ_inside σ²). A sample also
stops at ``max_steps`` (status STEP_LIMIT) or when its residual is not finite (NONFINITE). A
finished sample is frozen at the step it finished; finished samples leave the working batch when
removing them pays.

Solvers: Runge–Kutta tableaus (the ODE), the ``block`` sweep (red-black block coordinate descent
with the same steady-state test on the ODE's residual), and backends
(:data:`mep_hw.settle.BACKENDS`): ``brian2`` settles the layered Hopfield network as Brian2 rate
units, with this contract (:mod:`mep_hw.settle.brian2_backend`).

The state of all layers is packed into one tensor of shape (batch, N) (the dynamics' ``sizes``
give the layer widths), so each solver step costs a fixed number of tensor operations whatever
the depth, and the per-sample bookkeeping stays on the device: no host synchronisation inside
the step loop except the running count read every ``check_every`` steps.

A dynamics object provides ``sizes``, ``box`` (``(lo, hi)`` or None: states are kept in the box
by projection), ``field(s) -> Tensor`` and ``restrict(index) -> dynamics`` (the same dynamics on
the samples selected by the integer tensor ``index``); optionally ``noise_floor`` and
``row_work`` (work of one field evaluation per sample, for the compaction rule). The ``block``
solver also needs, on lists of per-layer views in layer order, ``block_field(s, parity, out)``
(write f_l(s) into ``out[l]`` for every layer l ≡ parity mod 2) and ``block_update(s, parity)``
(set those layers, in place, to s_l + f_l(s), their exact block minimiser). A layer's target
may depend on its own state (the last layer under a CE readout's nudge; a layer below a
max-pooled convolution, through its arg-max). A dynamics may say which parities have such
layers (``block_self_coupled(parity) -> bool``; without it, only the last layer's): that parity
is updated first in each sweep, so the other parity's residual is exactly 0 after its update.
If both have them, the steady-state test reads the second parity's residual as the step its last
update took (its target was computed at the state before that update), the test of a
fixed-point iteration.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, Protocol, Sequence

import torch
from torch import Tensor

from mep_hw.errors import ConfigError, SettleError
from mep_hw.settle.solvers import SOLVERS, Backend, Tableau, evals_per_step, get_backend, get_solver, get_sweep

__all__ = ["remedy", "BlockDynamics", "COMPACT_WORK", "CUDA_CHECK_EVERY", "ONE_THREAD_WORK", "Dynamics", "SettleConfig", "SettleResult", "SettleStatus", "settle",
           "integrate", "rk_step"]

# Compaction (taking finished rows out of the working batch) costs a fixed number of index
# operations; it pays once the rows it removes would cost at least this much work per step
# (multiply-accumulates and element operations; see settle). Set by measurement:
# mep_hw/benchmarks/settle_speed.py --compaction (docs/settle.md).
COMPACT_WORK = 2.0e6
# On an accelerator the running count is sent to the host every this many steps (without waiting
# for it: see _CountPoll).
CUDA_CHECK_EVERY = 4
# Most running counts on their way to the host at once; one more and the host waits for the oldest
# (a synchronisation, only when the host runs this far ahead of the device).
POLL_PENDING = 8
# Below this work per sweep (batch × row_work, multiply-accumulates and element operations) a CPU
# settle runs on one intra-op thread. Measured interleaved at 2 threads, EP gradient per batch of
# 100 after 2 epochs on 10k MNIST images: 784-500-10 (1.4e6) 10.3 → 8.7 ms with one thread;
# 784-2000-10 (5.6e6) 21.4 → 23.0 ms and 784-500-500-10 (5.2e7) 60 → 76 ms (two threads better).
ONE_THREAD_WORK = 3.0e6


class _DoneEvent:
    """A completed event: the copy it marks was synchronous (a CPU tensor)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


def _poll_event(dev: torch.device):
    """An event recorded on ``dev``'s current stream after the copy it marks (tests replace this
    to delay the completion)."""
    if dev.type == "cuda":
        ev = torch.cuda.Event()
        ev.record()
        return ev
    return _DoneEvent()


class _CountPoll:
    """The number of running samples, sent to the host without a synchronisation.

    ``push(running)`` counts on the device and copies the count to a pinned host buffer
    asynchronously, marking it with an event; ``poll()`` returns the newest count whose copy has
    completed (``event.query()``, which does not wait), or None. Counts arrive late, never
    wrong: the running set only shrinks, so a count of 0 read several steps after it was taken
    still means that every sample has finished (and frozen samples do not change). When more than
    :data:`POLL_PENDING` counts are in flight the host waits for the oldest: a synchronisation,
    but only when the host has run that far ahead of the device.
    """

    def __init__(self, dev: torch.device, slots: int = POLL_PENDING):
        pin = dev.type == "cuda"
        self.dev = dev
        self.slots = slots
        self.bufs = [torch.zeros((), dtype=torch.int64, pin_memory=pin) for _ in range(slots + 1)]
        self.pending: list[tuple[object, Tensor]] = []
        self.next = 0

    def push(self, running: Tensor) -> None:
        buf = self.bufs[self.next]
        self.next = (self.next + 1) % len(self.bufs)
        buf.copy_(torch.count_nonzero(running), non_blocking=True)
        self.pending.append((_poll_event(self.dev), buf))

    def poll(self) -> int | None:
        n = None
        while self.pending and self.pending[0][0].query():
            n = int(self.pending.pop(0)[1])
        if len(self.pending) > self.slots:  # too far ahead: wait for the oldest
            ev, buf = self.pending.pop(0)
            ev.synchronize()
            n = int(buf)
        return n


class Dynamics(Protocol):
    sizes: tuple[int, ...]
    box: tuple[float, float] | None
    noise_floor: float  # rms noise of the field per state component (0: exact; taken as 0 when absent)
    # optional: noise_vars, per layer the variance per component (box dynamics: counted where inside the box)

    def field(self, s: Tensor) -> Tensor: ...

    def restrict(self, keep: Tensor) -> "Dynamics": ...


class BlockDynamics(Dynamics, Protocol):
    """A layered dynamics the ``block`` solver can run (see the module docstring)."""

    def block_field(self, s: Sequence[Tensor], parity: int, out: Sequence[Tensor]) -> None: ...

    def block_update(self, s: Sequence[Tensor], parity: int) -> None: ...


class SettleStatus(IntEnum):
    CONVERGED = 0
    STEP_LIMIT = 1
    NONFINITE = 2

    @property
    def remedy(self) -> str:
        return _REMEDIES[self]


_REMEDIES = {
    SettleStatus.CONVERGED: "",
    SettleStatus.STEP_LIMIT: (
        "raise max_steps, loosen atol/rtol, use an adaptive solver (dopri5, bosh3), or make the "
        "dynamics contractive (bound the coupling's spectral norm below 1)"
    ),
    SettleStatus.NONFINITE: (
        "the dynamics diverged: lower dt or use an adaptive solver, lower the learning rate, or "
        "bound the weights' spectral norm (spectral constraint)"
    ),
}


def remedy(status: SettleStatus) -> str:
    """What to do about samples that ended with ``status`` (empty for CONVERGED)."""
    return _REMEDIES[SettleStatus(status)]


def _positive(name: str, v) -> None:
    if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise ConfigError(f"{name}={v!r} must be a finite number > 0")


def _nonneg(name: str, v) -> None:
    if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise ConfigError(f"{name}={v!r} must be a finite number ≥ 0")


@dataclass(frozen=True, kw_only=True)
class SettleConfig:
    """How to settle.

    ``dt`` is the step (fixed-step solvers) or the first step (adaptive), in units of τ.
    ``atol``/``rtol`` define the steady-state test; ``max_steps`` bounds the solver steps;
    no sample stops before ``min_steps`` (on noisy hardware the test can hold at step 0 although
    a nudge has not yet reached the hidden layers).
    ``err_atol``/``err_rtol`` control the local error of adaptive solvers; ``dt_max`` caps their
    step. ``omega`` is the block solver's relaxation: each half-sweep moves a layer to
    clip(s_l + ω·f_l) instead of its block target s_l + f_l (ω = 1: exact block coordinate
    descent; 1 < ω < 2: projected over-relaxation, the same fixed points in fewer sweeps on
    strongly coupled nets, see :func:`settle`); ``omega_first``, when given, is the factor of
    the first parity's half-sweep (the last layer's parity, or the one a dynamics declares
    self-coupled: see :func:`settle`), ``omega`` then that of the second
    only (``omega_first=1.3, omega=1``: the output layer over-relaxed, the other parity set
    exactly); other solvers take only ω = 1.
    """

    solver: str = "euler"
    dt: float = 0.5
    atol: float = 1e-4
    rtol: float = 1e-3
    max_steps: int = 200
    err_atol: float = 1e-4
    err_rtol: float = 1e-3
    dt_max: float = 1.0
    min_steps: int = 0
    omega: float = 1.0
    omega_first: float | None = None

    def __post_init__(self):
        get_backend(self.solver)  # validates the name against every solver and backend
        tab = SOLVERS.get(self.solver)
        _positive("dt", self.dt)
        _positive("dt_max", self.dt_max)
        for name in ("atol", "rtol", "err_atol", "err_rtol"):
            _nonneg(name, getattr(self, name))
        if self.atol == 0 and self.rtol == 0:
            raise ConfigError("atol and rtol are both 0: the steady-state test can never hold; set one > 0")
        if tab is not None and tab.adaptive and self.err_atol == 0 and self.err_rtol == 0:
            raise ConfigError("err_atol and err_rtol are both 0; the adaptive solver needs one > 0")
        if isinstance(self.max_steps, bool) or not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ConfigError(f"max_steps={self.max_steps!r} must be an integer ≥ 1")
        if isinstance(self.min_steps, bool) or not (isinstance(self.min_steps, int) and 0 <= self.min_steps <= self.max_steps):
            raise ConfigError(f"min_steps={self.min_steps!r} must be an integer in [0, max_steps={self.max_steps}]")
        for name in ("omega", "omega_first"):
            om = getattr(self, name)
            if om is None and name == "omega_first":
                continue
            if isinstance(om, bool) or not (isinstance(om, (int, float)) and 0.0 < om < 2.0):
                raise ConfigError(f"{name}={om!r} must be a relaxation factor in (0, 2) (1: exact block descent)")
            if om != 1.0 and get_sweep(self.solver) is None:
                raise ConfigError(f"{name}={om:g} relaxes the block solver's sweeps; solver={self.solver!r} takes {name}=1")

    def with_solver(self, solver: str) -> "SettleConfig":
        """This config with another solver; the block solver's relaxation is dropped (ω = 1) for a
        solver that takes none."""
        relax = {} if get_sweep(solver) is not None else dict(omega=1.0, omega_first=None)
        return dataclasses.replace(self, solver=solver, **relax)

    @property
    def omegas(self) -> tuple[float, float]:
        """(first parity's, second parity's) relaxation factors of the block solver."""
        return (float(self.omega if self.omega_first is None else self.omega_first), float(self.omega))

    def get_tableau(self) -> Tableau:
        return get_solver(self.solver)

    def get_backend(self) -> Backend | None:
        """The backend that runs this solver (e.g. brian2), or None for the torch engine."""
        return get_backend(self.solver)


class SettleResult(NamedTuple):
    """What a settle produced, per sample: nothing computed is dropped on failure."""

    states: tuple[Tensor, ...]  # per layer, (batch, n_l)
    status: Tensor  # int8 SettleStatus per sample
    steps: Tensor  # solver steps per sample (accepted and rejected)
    residual: Tensor  # final rms(f(s)) per sample
    time: Tensor  # settle time per sample, in units of τ
    nfev: int  # vector-field evaluations on the working batch

    @property
    def converged(self) -> bool:
        return bool((self.status == SettleStatus.CONVERGED).all())

    def counts(self) -> dict[str, int]:
        return {s.name.lower(): int((self.status == s).sum()) for s in SettleStatus}

    @property
    def message(self) -> str:
        n = self.status.numel()
        parts = []
        for st in (SettleStatus.NONFINITE, SettleStatus.STEP_LIMIT):
            bad = self.status == st
            k = int(bad.sum())
            if not k:
                continue
            if st is SettleStatus.STEP_LIMIT:
                what = (
                    f"{k} of {n} samples hit the step limit ({int(self.steps.max())} steps) with "
                    f"rms residual up to {float(self.residual[bad].max()):.3g}"
                )
            else:
                what = f"{k} of {n} samples became non-finite (NaN or inf)"
            parts.append(f"{st.name}: {what}; remedy: {st.remedy}")
        return "; ".join(parts) if parts else f"all {n} samples converged"


def rk_step(field, tab: Tableau, s: Tensor, k1: Tensor, h: float | Tensor, box=None):
    """One explicit Runge–Kutta step of ds/dt = field(s) from ``s`` with first stage ``k1``.

    ``h`` is a float or a (batch, 1) tensor of per-sample steps. The new state is projected
    onto ``box``; stage states are not (the field must be defined just outside the box, and
    projecting stages would hide an unstable step from the error estimate). Returns
    (s_new, stages); for a first-same-as-last tableau the last stage is field(s_new).
    """
    ks = [k1]
    n_eval = tab.stages - 1 if tab.fsal else tab.stages
    for i in range(1, n_eval):
        ks.append(field(_comb(s, tab.a[i], ks, h)))
    s_new = _proj(_comb(s, tab.b, ks, h), box)
    if tab.fsal:
        ks.append(field(s_new))
    return s_new, ks


def _comb(base: Tensor, coeffs, ks, h) -> Tensor:
    """base + h Σ_j coeffs[j] k_j (h a float or a (batch, 1) tensor)."""
    if isinstance(h, float):
        out = base
        for c, k in zip(coeffs, ks):
            if c != 0.0:
                out = out.add(k, alpha=h * c)
        return out if out is not base else base.clone()
    acc = None
    for c, k in zip(coeffs, ks):
        if c != 0.0:
            acc = k * c if acc is None else acc.add(k, alpha=c)
    return base.clone() if acc is None else torch.addcmul(base, h, acc)


def _proj(s: Tensor, box) -> Tensor:
    return s if box is None else s.clamp_(box[0], box[1])


def check_init(init: Sequence[Tensor], sizes: Sequence[int]) -> tuple[int, ...]:
    """The layer widths, after checking that ``init`` holds one (batch, width) tensor per layer."""
    sizes = tuple(int(n) for n in sizes)
    if len(init) != len(sizes) or any(t.ndim != 2 or t.shape[1] != n for t, n in zip(init, sizes)):
        raise ConfigError(
            f"initial state has layer shapes {[tuple(t.shape) for t in init]} but the dynamics "
            f"has layer widths {sizes}; pass one (batch, width) tensor per layer"
        )
    return sizes


class _OneThread:
    """Intra-op threads limited to one inside ``with`` (restored after), when ``on``."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        if self.on:
            self.n = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.on:
            torch.set_num_threads(self.n)
        return False


def _small_on_one_thread(fn):
    """``fn(dynamics, init, …)`` on one intra-op thread when it is a CPU settle whose sweep is
    small work (batch × the dynamics' ``row_work`` below :data:`ONE_THREAD_WORK`)."""

    @functools.wraps(fn)
    def run(dynamics, init, *args, **kw):
        first = init[0] if len(init) and isinstance(init[0], Tensor) and init[0].ndim == 2 else None
        small = (first is not None and first.device.type == "cpu" and torch.get_num_threads() > 1
                 and first.shape[0] * float(getattr(dynamics, "row_work", math.inf)) < ONE_THREAD_WORK)
        with _OneThread(small):
            return fn(dynamics, init, *args, **kw)

    return run


@_small_on_one_thread
def settle(
    dynamics: Dynamics,
    init: Sequence[Tensor],
    config: SettleConfig | None = None,
    *,
    throw: bool = True,
    compact_frac: float = 0.0,
    compact_min: int = 0,
    compact_work: float | None = None,
    check_every: int | None = None,
    poll: bool | None = None,
) -> SettleResult:
    """Settle ``dynamics`` from ``init`` (one (batch, n_l) tensor per layer) until each sample
    is steady (see the module docstring).

    A sample that meets the steady-state test is *frozen*: its state, residual and step count
    are those of the step at which it first met the test, whatever happens to the rest of the
    batch. Finished samples are removed from the working batch (compaction: a fixed number of
    index operations) only when that pays: when the work they would cost per step, counted as
    the dynamics' ``row_work`` (multiply-accumulates and element operations of one field
    evaluation per sample; 10·N if it does not say) times the evaluations per step, reaches
    ``compact_work`` (default :data:`COMPACT_WORK`), and they number at least ``compact_min`` and
    ``compact_frac`` of the working batch (0, 0 and 0: at once). The result does not depend on
    these knobs, only the cost does.

    The per-sample bookkeeping (steady-state test, running mask, step counts) stays on the
    tensors' device; the host reads the number of running samples only every ``check_every``
    steps (default: 1 on the CPU, where reading it costs nothing, :data:`CUDA_CHECK_EVERY` on
    other devices, where it is a host synchronisation), to stop the loop and decide compaction.
    Between checks finished samples stay frozen in the batch. With ``poll`` (default: on CUDA
    when compaction is off, as it is there by default) the count is not waited for: it is copied
    to the host asynchronously and read when its copy has completed (a CUDA event's ``query``),
    so the step loop has no synchronisation at all; the loop then stops a few masked steps after
    the last sample finished, with the same result (see :class:`_CountPoll`).

    ``solver="block"`` (:data:`mep_hw.settle.SWEEPS`) is red-black block coordinate descent on
    a layered dynamics (one with ``block_field``): each sweep sets every layer of the last
    layer's parity (or of the parity the dynamics declares self-coupled, see the module
    docstring) to s_l + f_l(s), then every layer of the other parity, where for a box field
    f_l = clip(d_l) − s_l the target clip(d_l) is the layer's exact minimiser of F given its
    neighbours (layers of one parity do not interact). The steady-state test is the ODE's, on
    the residual f(s) of the ODE field: with the other parity just set to its target, its part
    of f is zero (to rounding), so the field of the first parity, computed for the next sweep
    anyway, is the whole residual; the first test evaluates the full field. One sweep reads each
    array forward and transposed once, as one field evaluation does; its settle time is charged
    2 τ (two half-sweeps, each like an Euler step at dt = 1). ``dt`` is not used.

    A solver registered as a backend (``solver="brian2"``, see :data:`BACKENDS`) hands the
    settle to that backend, which has the same contract.

    On the CPU a settle whose sweep is small work (batch × the dynamics' ``row_work`` below
    :data:`ONE_THREAD_WORK`) runs on one intra-op thread: its element operations and narrow
    products are slower split over threads (measured, 2 threads: see the constant).

    Raises :class:`SettleError` (with the result attached) if any sample ends at the step limit
    or non-finite, unless ``throw=False``, in which case the status is in the result.
    """
    cfg = config or SettleConfig()
    backend = cfg.get_backend()
    if backend is not None:
        return backend.load()(dynamics, init, cfg, throw=throw, compact_frac=compact_frac, compact_min=compact_min)
    sweep = get_sweep(cfg.solver)
    tab = None if sweep is not None else cfg.get_tableau()
    box = dynamics.box
    sizes = check_init(init, dynamics.sizes)
    L = len(sizes)
    if check_every is None:
        check_every = 1 if init[0].device.type == "cpu" else CUDA_CHECK_EVERY
    if isinstance(check_every, bool) or not (isinstance(check_every, int) and check_every >= 1):
        raise ConfigError(f"check_every={check_every!r} must be an integer ≥ 1 (steps between host checks)")
    if sweep is not None:
        if getattr(dynamics, "block_field", None) is None:
            raise ConfigError(
                f"solver={cfg.solver!r} needs a layered dynamics with exact per-layer updates (block_field), which "
                f"{type(dynamics).__name__} does not have; use an ODE solver: {', '.join(SOLVERS)}"
            )
        # the last layer may depend on itself (an MSE output under β ≤ −1, the CE readout's nudge):
        # its parity goes first, so that the other parity's residual is zero at every test
        first = (L - 1) % 2
        coupled = getattr(dynamics, "block_self_coupled", None)
        lagged2 = False  # the second parity's residual is its last step (both parities self-coupled)
        if coupled is not None:
            c = (bool(coupled(0)), bool(coupled(1)))
            if c[0] != c[1]:  # the self-coupled parity goes first
                first = 0 if c[0] else 1
            lagged2 = c[1 - first]
        order = [l for l in range(L) if l % 2 == first] + [l for l in range(L) if l % 2 != first]
        n_first = sum(sizes[l] for l in order if l % 2 == first)
    else:
        order = list(range(L))
    s = _proj(torch.cat([init[l] for l in order], dim=1), box)  # our own copy, updated in place below
    B, N = s.shape
    dev, dtype = s.device, s.dtype
    offs = [0] * L
    o = 0
    for l in order:
        offs[l] = o
        o += sizes[l]

    def views(t: Tensor) -> list[Tensor]:  # per-layer views of a packed tensor, in layer order
        return [t[:, offs[l] : offs[l] + sizes[l]] for l in range(L)]

    dyn = dynamics
    field = dyn.field
    # a dynamics read through noisy devices declares the rms of its field noise per component:
    # twice that is added to the absolute tolerance (a settle cannot get below its own noise)
    atol_n = (cfg.atol + 2.0 * float(getattr(dynamics, "noise_floor", 0.0))) * math.sqrt(N)
    # with per-layer noise variances and a box, the noise reaches the residual only at components
    # strictly inside the box (a clipped component's field is exactly 0): the floor of a row is
    # 2·√(Σ_inside σ²), so a row with most units saturated is not let off by their zeros
    nv = getattr(dynamics, "noise_vars", None)
    inside_var = None
    if nv is not None and box is not None and any(v > 0 for v in nv):
        inside_var = torch.cat([torch.full((sizes[l],), float(nv[l]), dtype=dtype, device=dev) for l in order])
    use_rtol = cfg.rtol > 0
    # Euler with dt ≤ 1 on a box field of the form clip(·) − s moves each state to a convex
    # combination of two points of the box: projection is then a no-op and is skipped.
    euler = tab is not None and tab.name == "euler"
    pbox = None if (euler and cfg.dt <= 1.0) else box
    adaptive = tab is not None and tab.adaptive
    omega1, omega = cfg.omegas  # first parity's, second parity's
    relax = sweep is not None and omega != 1.0  # the second parity over-relaxed (and the first by omega1)
    relax1 = sweep is not None and omega1 != 1.0  # the first parity over-relaxed
    lo_b, hi_b = box if box is not None else (None, None)
    per_step = evals_per_step(cfg.solver)
    row_work = float(getattr(dynamics, "row_work", 10.0 * N)) * per_step
    # on an accelerator a compaction costs two host synchronisations (the nonzero of the finished
    # and of the running rows): measured on an H200 (benchmarks/results/cuda_check_sites.json) they
    # were half of the synchronisations of an EP step of 784-500-500-10, so there finished rows
    # stay in the batch, frozen by the mask, unless compact_work is given
    if compact_work is None:
        work_min = COMPACT_WORK if dev.type == "cpu" else math.inf
    else:
        work_min = float(compact_work)
    if poll is None:
        poll = dev.type == "cuda" and work_min == math.inf
    counts = _CountPoll(dev) if poll else None  # late counts: no compaction, which needs the running set now
    if adaptive:
        h: float | Tensor = torch.full((B, 1), float(cfg.dt), dtype=dtype, device=dev)
        t_now = torch.zeros(B, dtype=dtype, device=dev)
        expo = -1.0 / (tab.err_order + 1)
    running = torch.ones(B, dtype=torch.bool, device=dev)
    steps = torch.zeros(B, dtype=torch.int64, device=dev)
    if sweep is None:
        k = field(s)
    else:
        k = torch.empty_like(s)
        sv, kv = views(s), views(k)
        s1, s2, k1, k2 = s[:, :n_first], s[:, n_first:], k[:, :n_first], k[:, n_first:]
        dyn.block_field(sv, first, kv)
        dyn.block_field(sv, 1 - first, kv)  # the full field at s: s is not changed in between
        k2_zero = False  # the second parity's residual columns hold zeros
    nfev = 1
    rows = B  # rows in the working batch
    n_run: int | None = B  # running rows as of the last host check (None: not known now)
    eager = check_every == 1 and counts is None  # the host knows the running set after every test
    # eager: the steps taken while the running set stays the same are counted on the host (lag)
    # and added to the running rows when the set changes; otherwise they are added every step
    lag = 0
    mask = None  # float (rows, 1): 1 for running rows, while the set is known not to change
    active = None  # original index of each working row (None: all rows, in order)
    out = None  # outputs of rows taken out: state, ‖f‖, steps, time

    n = 0
    for n in range(cfg.max_steps + 1):
        # after an unmasked block sweep the second parity's residual is zero: the norm is the first's
        rn = torch.linalg.vector_norm(k1 if (sweep is not None and k2_zero) else k, dim=1)
        tested = n >= cfg.min_steps  # before min_steps no sample may stop
        if tested:
            thr = atol_n
            if inside_var is not None:
                thr = ((s > lo_b) & (s < hi_b)).to(dtype).matmul(inside_var).sqrt_().mul_(2.0).add_(cfg.atol * math.sqrt(N))
            if use_rtol:
                pending = rn > torch.linalg.vector_norm(s, dim=1).mul_(cfg.rtol).add_(thr)
            else:
                pending = rn > thr
            # NaN compares false, so a NaN residual counts as finished (it is labelled NONFINITE)
        last = n == cfg.max_steps
        if eager:
            if tested:
                new = running.logical_and(pending)
                n_new = int(torch.count_nonzero(new))  # a host read (free on the CPU, where eager is the default)
                if n_new != n_run:
                    if lag:
                        steps.add_(running, alpha=lag)
                        lag = 0
                    running, n_run, mask = new, n_new, None
        else:
            if tested:
                running.logical_and_(pending)
            mask = None
            if counts is not None:  # a late count; 0 means done, any other says nothing about now
                if n % check_every == 0:
                    counts.push(running)
                if last or counts.poll() == 0:
                    break
                n_run = None
            else:
                n_run = int(running.sum()) if (last or n % check_every == 0) else None  # a synchronisation
        if n_run is not None:
            if n_run == 0 or last:
                break
            n_fin = rows - n_run
            if n_fin and n_fin >= compact_frac * rows and n_fin >= compact_min and n_fin * row_work >= work_min:
                if lag:
                    steps.add_(running, alpha=lag)
                    lag = 0
                fin = running.logical_not().nonzero().squeeze(1)
                keep = running.nonzero().squeeze(1)
                if out is None:
                    out = (torch.empty_like(s), torch.empty_like(rn), torch.empty_like(steps),
                           torch.empty_like(t_now) if adaptive else None)
                    active = torch.arange(B, device=dev)
                dst = active[fin]
                out[0].index_copy_(0, dst, s[fin])
                out[1].index_copy_(0, dst, rn[fin])
                out[2].index_copy_(0, dst, steps[fin])
                if adaptive:
                    out[3].index_copy_(0, dst, t_now[fin])
                    h, t_now = h[keep], t_now[keep]
                active, s, k, steps = active[keep], s[keep], k[keep], steps[keep]
                running = torch.ones(n_run, dtype=torch.bool, device=dev)
                rows = n_run
                dyn = dyn.restrict(keep)
                field = dyn.field
                if sweep is not None:
                    sv, kv = views(s), views(k)
                    s1, s2, k1, k2 = s[:, :n_first], s[:, n_first:], k[:, :n_first], k[:, n_first:]
                    # the rows left hold their true residual (before the first sweep, the second
                    # parity's is not zero): the next unmasked sweep zeroes it
                    k2_zero = False
        every = n_run == rows  # every working row runs: no mask needed
        if eager:
            lag += 1
        else:
            steps.add_(running)
        if not every and mask is None:
            mask = running.unsqueeze(1).to(dtype)

        # Frozen rows take no step: their update is multiplied by 0 (a non-finite row, already
        # labelled NONFINITE, may turn NaN)
        if sweep is not None:  # red-black block coordinate descent
            # the first parity to its block target, computed with the last residual (over-relaxed:
            # to clip(s + omega1·f)); frozen rows keep their state and their residual
            if every:
                s1.add_(k1, alpha=omega1)
            else:
                s1.addcmul_(k1, mask, value=omega1)
            if relax or relax1:
                s1.clamp_(lo_b, hi_b)
            if relax:  # the second parity over-relaxed too (omega ≠ 1)
                # it moves to clip(s + ω f); its residual after the move is its block target (s + f,
                # unchanged by its own move) minus the new state: exact, so k stays the full field
                # at the current state for the steady-state test (lagged2: the target computed
                # before the move, as for ω = 1)
                dyn.block_field(sv, 1 - first, kv)
                t2 = s2 + k2
                (s2.add_(k2, alpha=omega) if every else s2.addcmul_(k2, mask, value=omega)).clamp_(lo_b, hi_b)
                torch.sub(t2, s2, out=k2)
                k2_zero = False
            elif lagged2:  # to its target; the residual kept is the step (the target moved with s2)
                if every:
                    dyn.block_field(sv, 1 - first, kv)
                    s2.add_(k2)
                else:  # frozen rows keep their residual (as compacted rows do)
                    old2 = k2.clone()
                    dyn.block_field(sv, 1 - first, kv)
                    s2.addcmul_(k2, mask)
                    k2.sub_(old2).mul_(mask).add_(old2)
                k2_zero = False
            elif every:  # the second parity exactly to its target: residual 0
                dyn.block_update(sv, 1 - first)
                if not k2_zero:
                    k2.zero_()
                    k2_zero = True
            else:
                dyn.block_field(sv, 1 - first, kv)
                s2.addcmul_(k2, mask)
                k2.addcmul_(k2, mask, value=-1.0)  # running rows: at their block target, residual 0
                k2_zero = False
            dyn.block_field(sv, first, kv)
            nfev += 1
            continue
        if euler:  # s ← s + dt·f(s), in place
            _proj(s.add_(k, alpha=cfg.dt) if every else s.addcmul_(k, mask, value=cfg.dt), pbox)
            k = field(s)
            nfev += 1
            continue
        if not adaptive:
            s_new, _ = rk_step(field, tab, s, k, float(cfg.dt), pbox)
            s = s_new if every else torch.where(running.unsqueeze(1), s_new, s)
            k = field(s)
            nfev += tab.stages
            continue
        s_new, ks = rk_step(field, tab, s, k, h, pbox)
        nfev += tab.stages - 1
        # local error estimate, per component scaled by err_atol + err_rtol·max(|s|, |s_new|)
        err = _comb(torch.zeros_like(s), tab.b_err, ks, h)
        scale = torch.maximum(s.abs(), s_new.abs()).mul_(cfg.err_rtol).add_(cfg.err_atol)
        en = torch.linalg.vector_norm(err.div_(scale), dim=1) / math.sqrt(N)
        accept = en <= 1.0
        if not every:
            accept.logical_and_(running)  # frozen rows take no step
        factor = torch.nan_to_num(0.9 * en.clamp_min(1e-10).pow(expo), nan=0.2).clamp(0.2, 5.0)
        acc = accept.unsqueeze(1)
        s = torch.where(acc, s_new, s)
        k = torch.where(acc, ks[-1], k)
        t_now = t_now + torch.where(accept, h.squeeze(1), 0.0)
        h = (h * factor.unsqueeze(1)).clamp_max(cfg.dt_max)
    if lag:
        steps.add_(running, alpha=lag)

    # Assemble the per-sample outputs in the original sample order.
    if out is not None:
        out[0].index_copy_(0, active, s)
        out[1].index_copy_(0, active, rn)
        out[2].index_copy_(0, active, steps)
        run_all = torch.zeros(B, dtype=torch.bool, device=dev).index_copy_(0, active, running)
        if adaptive:
            out[3].index_copy_(0, active, t_now)
            t_now = out[3]
        s, rn, steps, running = out[0], out[1], out[2], run_all
    # rn ≥ 0: rn < inf is its finiteness test in one operation (NaN compares false)
    status = torch.where(rn < math.inf, running.to(torch.int8), int(SettleStatus.NONFINITE))
    if adaptive:
        time = t_now
    else:
        time = steps.to(dtype) * (sweep.time_per_step if sweep is not None else cfg.dt)
    states = tuple(views(s))
    result = SettleResult(states, status, steps, rn / math.sqrt(N), time, nfev)
    if throw and not result.converged:
        raise SettleError(f"settle did not reach a steady state: {result.message}", result)
    return result


def integrate(field, y0: Tensor, t_end: float, n_steps: int, solver: str = "rk4") -> Tensor:
    """Integrate dy/dt = field(y) from 0 to ``t_end`` in ``n_steps`` fixed steps with any tableau
    (an adaptive one propagates its higher-order solution). For solver checks and small ODEs."""
    tab = get_solver(solver)  # a backend name is an error here: integrate runs tableaus only
    h = float(t_end) / n_steps
    y = y0
    for _ in range(n_steps):
        y, _ = rk_step(field, tab, y, field(y), h)
    return y

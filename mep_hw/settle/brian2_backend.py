"""Brian2 backend of the settle engine (``solver="brian2"``): the layered Hopfield network as
continuous-time rate units simulated by Brian2 (Stimberg, Brette & Goodman 2019).

Governing equation, per unit i of state layer l of sample b (time in units of τ, mapped to Brian2
time with τ = 1 ms, step dt·τ)::

    τ ds/dt = f(s)

    box activation (hard sigmoid, box [lo, hi]):   f = clip(d, lo, hi) − s
    smooth activation (sigmoid):                   f = −s + ρ'(s)·d

    d_l = W_{l−1} ρ(s_{l−1}) + W_lᵀ ρ(s_{l+1}) + b_l          (ρ(s_0) := x, W_0 x + b_0 constant)

the field of :class:`mep_hw.model.hopfield.HopfieldDynamics` (its ``field`` docstring derives the
box form). Nudged phases add, on the output layer L:

* MSE, box activation: f = clip(a·d + c − k·s, lo, hi) − s with a = 1/(1+β), c = βy/(1+β), k = 0
  (the exact per-unit minimiser of F; where 1 + β ≤ 0: a = 1, c = βy, k = β);
* MSE, smooth activation: f = −s + ρ'(s)·d − β(s − y);
* CE readout: d_L gains −W_outᵀ β(softmax(W_out ρ(s_L) + b_out) − y).

β may differ per sample (a (batch, 1) tensor), as in the symmetric estimator's ±β batch.

How it is written for Brian2: one ``NeuronGroup`` per state layer holding the whole batch
(batch × width units; unit b·n_l + i is unit i of sample b), with the equations above as Brian2
equation strings (ρ, ρ' and f are subexpressions); the constant drive W₀x + b₀ (first layer) or
b_l (others) is a per-unit parameter. Each W_l between state layers is one ``Synapses`` object
that connects units of the same sample only (batch × n_l × n_{l+1} synapses, w = W_l[j, i]) and
carries two summed variables: ``up_post = w·ρ(s_pre)`` (W_l ρ(s_l) into layer l+1) and
``down_pre = w·ρ(s_post)`` (W_lᵀ ρ(s_{l+1}) into layer l). The softmax of the CE readout couples
the output units of a sample through a normalisation that is no sum of pairwise terms; it is
computed by a ``NetworkOperation`` (numpy) at the start of every step, which writes the nudge
drive into a per-unit parameter. Brian2 updates summed variables once per step, before the state
updaters, so its ``euler`` method is exactly the synchronous forward-Euler step
s ← s + dt·f(s) of the torch engine (the only method offered: a higher-order Brian2 method would
hold the synaptic input fixed over the step and so stay first order in the coupling).

Steady-state stop, as in :func:`mep_hw.settle.settle`: after the synaptic input of step n is
summed, a ``run_regularly`` operation stores f(s_n) per unit and a ``NetworkOperation`` evaluates
rms(f(s)) ≤ atol + rtol·rms(s) per sample (atol raised by 2 × the dynamics' ``noise_floor``, no
stop before ``min_steps``; a NaN residual counts as finished and is labelled NONFINITE) and
records the step at which each sample first meets it. A finished sample is frozen at that step,
as in the torch engine (its units get ``active = 0``, so ds/dt = 0; samples do not interact, so
the residual stays that of the freezing step): both return the same states, residuals and
steps, each sample's independent of its batch (``compact_frac`` and ``compact_min`` are
accepted for the common signature; like the torch engine's compaction they change no result,
and Brian2 has no working batch to shrink). The network stops once no sample
is running or at ``max_steps``. The test runs at every step inside one ``Network.run`` (the
``NetworkOperation`` calls ``Network.stop()``), not at the end of chunks of steps, so step
counts are exact.

The simulation runs with Brian2's ``numpy`` code-generation target (``brian2``: no compiler
needed) or its ``cython`` target (``brian2_cython``: compiled C, a faster step; the first call
compiles for tens of seconds, later ones load Brian2's cache), the preference restored
afterwards, in float64, in a fresh ``Network`` per call; results come back as tensors of the
initial state's dtype and device. Only exact weights are supported:
dynamics whose coupling operators are device tiles (``--device``) raise ConfigError.
"""

from __future__ import annotations

import gc
import logging
import math
import sys
import warnings
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from mep_hw.errors import ConfigError, SettleError
from mep_hw.model.hopfield import DenseCoupling, HopfieldDynamics, _mse_output_map
from mep_hw.settle.engine import SettleConfig, SettleResult, SettleStatus, check_init
from mep_hw.settle.solvers import BACKENDS

__all__ = ["settle_brian2", "SMOOTH_ACTIVATIONS"]

#: Brian2 expressions of ρ(s) and of ρ'(s) (in terms of r = ρ(s)) for activations without a box;
#: every activation with a box is the identity on it, ρ(s) = clip(s, lo, hi).
SMOOTH_ACTIVATIONS: dict[str, tuple[str, str]] = {
    "sigmoid": ("1 / (1 + exp(2 - 4*s))", "4*r*(1 - r)"),  # σ(4s − 2), see mep_hw.model.activations
}

_ORDER_FIELD = -0.5  # after the summed variables (order −1), before the state updaters (order 0)
_ORDER_STOP = -0.25
_ORDER_PROJECT = 1  # after the state updaters


def _import_brian2():
    """brian2, imported on first use. Importing it installs Brian2's own ``sys.excepthook`` (which
    reports any uncaught error as a Brian2 bug) and routes all Python warnings to its logger; when
    this is the first import, the process's hook and warning display are put back."""
    first = "brian2" not in sys.modules
    hook, show = sys.excepthook, warnings.showwarning
    try:
        import brian2
    except Exception as e:  # an ImportError, or a brian2 that fails against this numpy
        raise ConfigError(
            f"solver 'brian2' needs the brian2 package, and importing it failed ({type(e).__name__}: {e}); "
            "install it with `pip install brian2` (brian2 2.9 needs numpy < 2.4: `pip install 'numpy<2.4'`), "
            "or pick a torch solver (euler, heun, rk4, bosh3, dopri5)"
        ) from e
    finally:
        if first:
            sys.excepthook = hook
            if warnings.showwarning is not show:  # brian2 called logging.captureWarnings(True)
                logging.captureWarnings(False)
    return brian2


@contextmanager
def _codegen_target(b2, target: str):
    """Brian2's runtime code generation for ``target`` during the block (numpy: no compiler)."""
    prefs = b2.prefs
    old = prefs.codegen.target
    prefs.codegen.target = target
    try:
        yield
    finally:
        prefs.codegen.target = old


@contextmanager
def _gc_frozen():
    """Objects that exist when the block starts are left out of garbage collection during it;
    at its end the garbage made inside it is collected, then everything is unfrozen.

    Brian2's ``Network.run`` starts with a full ``gc.collect()`` (to warn about objects left out
    of a network); in a process that holds torch, a dataset and a model that costs more than
    settling a small network (≈0.3 s), and frozen objects are skipped by it. The Brian2 objects of
    a settle form reference cycles: collecting them while the rest is still frozen is cheap, and
    keeps them from piling up in the oldest generation. If the process has frozen objects of its
    own, the collector is left alone (unfreezing would release them too).
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
        gc.collect()
    finally:
        gc.unfreeze()


def _check(dynamics, init: Sequence[Tensor], cfg: SettleConfig) -> tuple[int, ...]:
    if cfg.solver not in BACKENDS or BACKENDS[cfg.solver].function != "settle_brian2":
        raise ConfigError(
            f"settle_brian2 runs the brian2 solvers, but the config has solver={cfg.solver!r}; "
            "set solver='brian2', or call mep_hw.settle.settle for the torch solvers"
        )
    if not isinstance(dynamics, HopfieldDynamics):
        raise ConfigError(
            f"the brian2 backend settles the layered Hopfield network (a HopfieldDynamics), got "
            f"{type(dynamics).__name__}; use a torch solver (euler, heun, rk4, bosh3, dopri5) for other dynamics"
        )
    exotic = sorted({type(op).__name__ for op in dynamics.ops if not isinstance(op, DenseCoupling)})
    if exotic:
        raise ConfigError(
            f"the brian2 backend runs ideal weights only, but the weights are read through "
            f"{', '.join(exotic)} (device tiles of a --device run); drop --device, or pick a torch "
            "solver (euler, heun, rk4, bosh3, dopri5) for hardware-faithful settling"
        )
    act = dynamics.act
    if act.box is None and act.name not in SMOOTH_ACTIVATIONS:
        raise ConfigError(
            f"the brian2 backend has no equation for activation {act.name!r}; it supports box "
            f"activations (hard_sigmoid) and {', '.join(SMOOTH_ACTIVATIONS)}; use a torch solver"
        )
    return check_init(init, dynamics.sizes)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _per_unit(v, B: int, n: int) -> np.ndarray:
    """A float, a (B, 1) tensor (per sample) or a (B, n) tensor as one value per unit (B·n)."""
    if isinstance(v, Tensor):
        return np.ascontiguousarray(np.broadcast_to(_np(v), (B, n))).ravel()
    return np.full(B * n, float(v))


def _equations(l: int, L: int, dyn: HopfieldDynamics) -> str:
    """The Brian2 equations of state layer l of L."""
    box, ce, nudged = dyn.box is not None, dyn.cost == "ce", dyn.nudged
    out = l == L - 1
    terms = ["ext"]  # the constant drive: W₀x + b₀ (first layer) or b_l
    terms += ["up"] if l > 0 else []  # W_{l−1} ρ(s_{l−1}), summed by the synapses from below
    terms += ["down"] if l < L - 1 else []  # W_lᵀ ρ(s_{l+1}), summed by the synapses from above
    terms += ["dce"] if out and ce and nudged else []  # the CE readout's nudge, by a NetworkOperation
    lines = ["ds/dt = active * fld / tau : 1", f"drive = {' + '.join(terms)} : 1"]
    mse_nudge = out and nudged and dyn.cost == "mse"
    if box:
        lines.append("r = clip(s, lo, hi) : 1")
        inner = "a*drive + c - kc*s" if mse_nudge else "drive"
        lines.append(f"fld = clip({inner}, lo, hi) - s : 1")
        if mse_nudge:
            lines += ["a : 1 (constant)", "c : 1 (constant)", "kc : 1 (constant)"]
    else:
        rho, drho = SMOOTH_ACTIVATIONS[dyn.act.name]
        lines += [f"r = {rho} : 1", f"rp = {drho} : 1"]
        lines.append("fld = -s + rp*drive - bn*(s - yn) : 1" if mse_nudge else "fld = -s + rp*drive : 1")
        if mse_nudge:
            lines += ["bn : 1 (constant)", "yn : 1 (constant)"]
    lines.append("ext : 1 (constant)")
    lines.append("active : 1")  # 1 while the unit's sample settles, 0 once it met the test (frozen)
    lines += [f"{v} : 1" for v in terms[1:]]  # summed-variable targets and the CE nudge drive
    lines.append("res : 1")  # f(s) at the current step, for the steady-state test
    return "\n".join(lines)


def settle_brian2(
    dynamics: HopfieldDynamics,
    init: Sequence[Tensor],
    config: SettleConfig | None = None,
    *,
    throw: bool = True,
    compact_frac: float = 0.0,
    compact_min: int = 0,
) -> SettleResult:
    """Settle ``dynamics`` from ``init`` (one (batch, n_l) tensor per layer) with Brian2 (see the
    module docstring for the equations and how they are simulated).

    Same contract and result as :func:`mep_hw.settle.settle`: per-sample status (CONVERGED,
    STEP_LIMIT, NONFINITE), steps (the step at which the sample first met the steady-state
    test, or ``max_steps``), final rms residual, time (steps·dt, in units of τ) and ``nfev``
    (evaluations of the field on the batch, one per step taken plus the first). Each finished
    sample is frozen at its finishing step, as in the torch engine, which makes its result
    independent of its batch (``compact_frac`` and ``compact_min`` change nothing). Raises
    :class:`SettleError` with the result attached unless every sample converged or ``throw=False``;
    raises :class:`ConfigError` for what it cannot run (device tiles, other dynamics, another
    solver's config).
    """
    cfg = config or SettleConfig(solver="brian2")
    sizes = _check(dynamics, init, cfg)
    b2 = _import_brian2()
    target = BACKENDS[cfg.solver].target
    if target == "cython":
        from brian2.codegen.runtime.cython_rt import CythonCodeObject

        if not CythonCodeObject.is_available():
            raise ConfigError(
                f"solver {cfg.solver!r} compiles Brian2's code with Cython, which is not available here (Cython "
                "and a C compiler are needed); use solver 'brian2' (numpy, no compiler)"
            )
    s0 = [_np(t) for t in init]
    if dynamics.box is not None:
        s0 = [np.clip(v, *dynamics.box) for v in s0]
    with _codegen_target(b2, target), _gc_frozen():
        states, rn, n, fin_step = _simulate(b2, dynamics, s0, sizes, cfg)
    return _result(states, rn, n, fin_step, sizes, cfg, init[0].dtype, init[0].device, throw)


def _simulate(b2, dyn: HopfieldDynamics, s0: list[np.ndarray], sizes: tuple[int, ...], cfg: SettleConfig):
    """Build the Brian2 network of ``dyn`` at states ``s0`` and run it to the stop; returns the
    states (one (B, n_l) array per layer), the residual norms ‖f‖ per sample, the last step and
    the finishing step per sample (−1: not finished)."""
    L, B = len(sizes), s0[0].shape[0]
    box = dyn.box
    clock = b2.Clock(dt=cfg.dt * b2.ms)
    ns = {"tau": 1.0 * b2.ms}  # dimensionless time in units of τ = 1 ms
    if box is not None:
        ns.update(lo=float(box[0]), hi=float(box[1]))
    method = BACKENDS[cfg.solver].method
    groups = []
    for l, n in enumerate(sizes):
        g = b2.NeuronGroup(B * n, _equations(l, L, dyn), method=method, clock=clock, namespace=ns,
                           name=f"mep_settle_layer{l}*")
        g.s = s0[l].ravel()
        g.active = 1.0
        g.ext = _np(dyn.drive0()).ravel() if l == 0 else np.tile(_np(dyn.biases[l]), B)
        groups.append(g)
    objects: list = list(groups)
    for l in range(L - 1):  # W_{l+1} (n_{l+1} × n_l) couples state layers l and l+1, within each sample
        n_pre, n_post = sizes[l], sizes[l + 1]
        syn = b2.Synapses(
            groups[l], groups[l + 1],
            model="w : 1 (constant)\nup_post = w * r_pre : 1 (summed)\ndown_pre = w * r_post : 1 (summed)",
            clock=clock, namespace=ns, name=f"mep_settle_w{l + 1}*",
        )
        b, i, j = np.meshgrid(np.arange(B), np.arange(n_pre), np.arange(n_post), indexing="ij")
        syn.connect(i=(b * n_pre + i).ravel(), j=(b * n_post + j).ravel())
        syn.w = np.broadcast_to(_np(dyn.ops[l + 1].W).T, (B, n_pre, n_post)).ravel()
        objects.append(syn)
    out, n_last = groups[-1], sizes[-1]
    if dyn.nudged and dyn.cost == "mse":
        if box is not None:
            a, c, k = _mse_output_map(dyn.beta, dyn.target)
            out.a, out.c = _per_unit(a, B, n_last), _per_unit(c, B, n_last)
            out.kc = _per_unit(0.0 if k is None else k, B, n_last)
        else:
            out.bn, out.yn = _per_unit(dyn.beta, B, n_last), _per_unit(dyn.target, B, n_last)
    for g in groups:
        objects.append(g.run_regularly("res = fld", clock=clock, when="groups", order=_ORDER_FIELD))
        if box is not None and cfg.dt > 1.0:  # Euler with dt > 1 can leave the box: project
            objects.append(g.run_regularly("s = clip(s, lo, hi)", clock=clock, when="groups",
                                           order=_ORDER_PROJECT))
    if dyn.nudged and dyn.cost == "ce":
        s_last, dce = out.variables["s"].get_value(), out.variables["dce"].get_value()
        objects.append(b2.NetworkOperation(_ce_nudge(dyn, s_last, dce, B, n_last), clock=clock, when="start",
                                           name="mep_settle_ce*"))
    test = _SteadyStateTest(groups, B, sum(sizes), cfg, float(getattr(dyn, "noise_floor", 0.0)))
    objects.append(b2.NetworkOperation(test, clock=clock, when="groups", order=_ORDER_STOP, name="mep_settle_stop*"))
    test.net = net = b2.Network(*objects, name="mep_settle*")
    while test.result is None:  # one run normally; the loop only guards Brian2's rounding of the duration
        # names resolve in the groups' namespaces only, never in the caller's frame
        net.run((cfg.max_steps + 1 - test.n) * clock.dt, namespace={})
    states, rn, n = test.result
    return states, rn, n, test.fin_step


class _SteadyStateTest:
    """Called by Brian2 at every step n, after f(s_n) is stored in ``res`` and before the update:
    rms(f) ≤ atol + rtol·rms(s) per sample, as in :func:`mep_hw.settle.settle`. Finished samples
    are frozen at their finishing step, as in the torch engine, and the network is stopped when
    no sample is left running or at ``max_steps``."""

    def __init__(self, groups, B: int, N: int, cfg: SettleConfig, noise_floor: float):
        # live views of Brian2's arrays (runtime device, numpy or cython): reading and writing them copies nothing
        self.s = [g.variables["s"].get_value() for g in groups]
        self.res = [g.variables["res"].get_value() for g in groups]
        self.active = [g.variables["active"].get_value() for g in groups]
        self.B, self.cfg = B, cfg
        self.atol_n = (cfg.atol + 2.0 * noise_floor) * math.sqrt(N)
        self.running = np.ones(B, dtype=bool)  # not yet finished
        self.working = np.ones(B, dtype=bool)  # not yet frozen (the torch engine's working batch)
        self.fin_step = np.full(B, -1, dtype=np.int64)
        self.rn = np.zeros(B)  # ‖f‖ when the sample was taken out
        self.n = 0
        self.net = None
        self.result = None

    def _norm(self, arrays) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging sample: inf or NaN, labelled NONFINITE
            return np.sqrt(sum(np.square(v.reshape(self.B, -1)).sum(1) for v in arrays))

    def __call__(self):
        n, cfg, B = self.n, self.cfg, self.B
        rn = self._norm(self.res)
        with np.errstate(over="ignore", invalid="ignore"):
            if n < cfg.min_steps:  # too early to stop anyone
                pending = np.ones(B, dtype=bool)
            elif cfg.rtol > 0:
                pending = rn > self._norm(self.s) * cfg.rtol + self.atol_n
            else:
                pending = rn > self.atol_n
        # NaN compares false: a NaN residual counts as finished (it is labelled NONFINITE)
        new = self.running & ~pending
        self.fin_step[new] = n
        self.running &= ~new
        if not self.running.any() or n == cfg.max_steps:
            self.rn[self.working] = rn[self.working]
            self.result = ([v.reshape(B, -1).copy() for v in self.s], self.rn, n)
            self.net.stop()  # takes effect after this step; the states of step n are kept above
        else:
            done = self.working & ~self.running  # finished at this step: frozen now
            if done.any():
                self.rn[done] = rn[done]
                self.working &= ~done
                for v in self.active:  # frozen: ds/dt = 0, and f stays that of step n
                    v.reshape(B, -1)[done] = 0.0
        self.n = n + 1


def _ce_nudge(dyn: HopfieldDynamics, s_last: np.ndarray, dce: np.ndarray, B: int, n_last: int):
    """The CE readout's nudge drive −W_outᵀ β(softmax(W_out ρ(s_L) + b_out) − y), per unit."""
    W = _np(dyn.ops[-1].W)  # (classes, n_L)
    bias = _np(dyn.biases[-1])
    y = _np(dyn.target)
    beta = _np(dyn.beta) if isinstance(dyn.beta, Tensor) else float(dyn.beta)
    fn = dyn.act.fn

    def ce_nudge():
        r = fn(torch.from_numpy(s_last.reshape(B, n_last))).numpy()
        z = r @ W.T + bias
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        dce[:] = (-((p - y) * beta) @ W).ravel()

    return ce_nudge


def _result(states, rn, n, fin_step, sizes, cfg, dtype, device, throw) -> SettleResult:
    def t(a, dt=dtype):
        return torch.as_tensor(a, dtype=dt).to(device)

    done = fin_step >= 0
    status = np.where(done, int(SettleStatus.CONVERGED), int(SettleStatus.STEP_LIMIT))
    status = np.where(np.isnan(rn) | np.isinf(rn), int(SettleStatus.NONFINITE), status)
    steps = np.where(done, fin_step, n)
    N = sum(sizes)
    result = SettleResult(
        tuple(t(v) for v in states),
        t(status, torch.int8),
        t(steps, torch.int64),
        t(rn / math.sqrt(N)),
        t(steps * cfg.dt),
        n + 1,
    )
    if throw and not result.converged:
        raise SettleError(f"settle did not reach a steady state: {result.message}", result)
    return result

"""Explicit Runge–Kutta solvers as Butcher tableaus, in a registry keyed by name.

Fixed step: ``euler`` (order 1), ``heun`` (explicit trapezoid, order 2), ``rk4`` (classic,
order 4). Adaptive with an embedded error estimate: ``bosh3`` (Bogacki & Shampine 1989, 3(2))
and ``dopri5`` (Dormand & Prince 1980, 5(4)); both are first-same-as-last, so an accepted step
hands its last stage on as the next step's first.

Sweeps: ``block`` is not an ODE method but a fixed-point iteration of the layered network that the
torch engine runs with the same steady-state test and contract, in a registry ``SWEEPS``: red-black
block coordinate descent, where each sweep sets the even layers, then the odd layers (or the
other way round) to their exact minimiser given their neighbours (see
:func:`mep_hw.settle.engine.settle`). It needs a dynamics with ``block_field``
(:class:`mep_hw.model.HopfieldDynamics` with a box activation).

Backends: solvers that are not run by the torch engine but by separate simulators, in a
registry ``BACKENDS`` (the settle function of each is imported only when it is used):
``brian2`` settles the layered Hopfield network as Brian2 rate units, integrated by Brian2's
``euler`` method with Brian2's numpy code generation (no compiler), ``brian2_cython`` the same
compiled by Cython (see :mod:`mep_hw.settle.brian2_backend`). ``SOLVER_NAMES`` lists every valid
``solver`` name: tableaus, sweeps, backends. :func:`evals_per_step` says how many field
evaluations' worth of array reads one step of a solver costs (the cost model's ``stages``).
"""

from __future__ import annotations

import importlib
from typing import Callable, NamedTuple

from mep_hw.errors import ConfigError

__all__ = ["Backend", "BACKENDS", "SOLVER_NAMES", "SOLVERS", "SWEEPS", "Sweep", "Tableau", "check_solver", "evals_per_step",
           "get_backend", "get_solver", "get_sweep"]


class Tableau(NamedTuple):
    name: str
    order: int  # order of the solution that is propagated
    a: tuple[tuple[float, ...], ...]  # a[i] holds a_{i,0..i-1}; a[0] is empty
    b: tuple[float, ...]
    b_err: tuple[float, ...] | None  # b − b̂ of the embedded pair (None: fixed step)
    err_order: int  # order of the embedded (lower) solution; step control uses 1/(err_order+1)
    fsal: bool

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None

    @property
    def stages(self) -> int:
        return len(self.b)


def _err(b, bhat):
    return tuple(x - y for x, y in zip(b, bhat))


_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DOPRI5_BHAT = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_BOSH3_B = (2 / 9, 1 / 3, 4 / 9, 0.0)
_BOSH3_BHAT = (7 / 24, 1 / 4, 1 / 3, 1 / 8)

SOLVERS: dict[str, Tableau] = {
    "euler": Tableau("euler", 1, ((),), (1.0,), None, 0, False),
    "heun": Tableau("heun", 2, ((), (1.0,)), (0.5, 0.5), None, 0, False),
    "rk4": Tableau(
        "rk4", 4, ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6), None, 0, False
    ),
    "bosh3": Tableau(
        "bosh3", 3, ((), (0.5,), (0.0, 0.75), (2 / 9, 1 / 3, 4 / 9)), _BOSH3_B, _err(_BOSH3_B, _BOSH3_BHAT), 2, True
    ),
    "dopri5": Tableau(
        "dopri5",
        5,
        (
            (),
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            _DOPRI5_B[:6],
        ),
        _DOPRI5_B,
        _err(_DOPRI5_B, _DOPRI5_BHAT),
        4,
        True,
    ),
}


class Backend(NamedTuple):
    """A settle backend: ``name`` is its solver name, ``method`` the backend's own integration method,
    ``order`` that method's order, ``target`` the code it generates to run (``numpy``: needs no
    compiler; ``cython``: a C compiler), and ``module``:``function`` the settle function with the
    contract of :func:`mep_hw.settle.settle` (imported lazily by :meth:`load`)."""

    name: str
    method: str
    order: int
    target: str
    module: str
    function: str

    def load(self) -> Callable:
        return getattr(importlib.import_module(self.module), self.function)


class Sweep(NamedTuple):
    """A fixed-point solver of the torch engine that is not a Runge–Kutta method: ``name`` is its
    solver name, ``method`` what one step (a sweep) does, ``evals_per_step`` the array reads of
    one sweep in units of one field evaluation (every array read forward and transposed once)
    and ``time_per_step`` the settle time charged per sweep, in units of τ."""

    name: str
    method: str
    evals_per_step: int
    time_per_step: float


SWEEPS: dict[str, Sweep] = {
    # one sweep = two half-sweeps, each a simultaneous update of every layer of one parity; like an
    # Euler step at dt = 1 (s ← clip(drive)) each half-sweep is charged one τ
    "block": Sweep("block", "red-black block coordinate descent (exact per-layer minimiser)", 1, 2.0),
}

BACKENDS: dict[str, Backend] = {
    "brian2": Backend("brian2", "euler", 1, "numpy", "mep_hw.settle.brian2_backend", "settle_brian2"),
    "brian2_cython": Backend("brian2_cython", "euler", 1, "cython", "mep_hw.settle.brian2_backend", "settle_brian2"),
}

SOLVER_NAMES: tuple[str, ...] = (*SOLVERS, *SWEEPS, *BACKENDS)


def check_solver(name: str) -> None:
    """Raise ConfigError unless ``name`` is a registered solver (a tableau, a sweep or a backend)."""
    if name not in SOLVERS and name not in SWEEPS and name not in BACKENDS:
        raise ConfigError(f"unknown solver {name!r}; valid solvers: {', '.join(SOLVER_NAMES)}")


def get_backend(name: str) -> Backend | None:
    """The backend registered under ``name``, or None for a tableau; unknown names list the
    valid ones."""
    check_solver(name)
    return BACKENDS.get(name)


def get_sweep(name: str) -> Sweep | None:
    """The sweep solver registered under ``name``, or None for a tableau or a backend; unknown
    names list the valid ones."""
    check_solver(name)
    return SWEEPS.get(name)


def get_solver(name: str) -> Tableau:
    """The tableau registered under ``name``; unknown names list the valid ones."""
    check_solver(name)
    try:
        return SOLVERS[name]
    except KeyError:
        what = f"a backend ({BACKENDS[name].module})" if name in BACKENDS else f"a sweep ({SWEEPS[name].method})"
        raise ConfigError(
            f"solver {name!r} is {what}, not a Runge–Kutta tableau of the torch engine; use one of "
            f"{', '.join(SOLVERS)} here"
        ) from None


def evals_per_step(name: str) -> int:
    """Field evaluations' worth of array reads per solver step: a tableau's stages, one per
    sweep of a sweep solver (each array read forward and transposed once), one per step of a
    backend (forward Euler)."""
    check_solver(name)
    if name in SOLVERS:
        return SOLVERS[name].stages
    if name in SWEEPS:
        return SWEEPS[name].evals_per_step
    return 1

"""Explicit Runge–Kutta solvers as Butcher tableaus, in a registry keyed by name.

Fixed step: ``euler`` (order 1), ``heun`` (explicit trapezoid, order 2), ``rk4`` (classic,
order 4). Adaptive with an embedded error estimate: ``bosh3`` (Bogacki & Shampine 1989, 3(2))
and ``dopri5`` (Dormand & Prince 1980, 5(4)); both are first-same-as-last, so an accepted step
hands its last stage on as the next step's first.

Backends: solvers that are not tableaus run by the torch engine but separate simulators, in a
second registry ``BACKENDS`` (the settle function of each is imported only when it is used):
``brian2`` settles the layered Hopfield network as Brian2 rate units, integrated by Brian2's
``euler`` method with Brian2's numpy code generation (no compiler), ``brian2_cython`` the same
compiled by Cython (see :mod:`mep_hw.settle.brian2_backend`). ``SOLVER_NAMES`` lists every valid
``solver`` name, tableaus first.
"""

from __future__ import annotations

import importlib
from typing import Callable, NamedTuple

from mep_hw.errors import ConfigError

__all__ = ["Backend", "BACKENDS", "SOLVER_NAMES", "SOLVERS", "Tableau", "check_solver", "get_backend", "get_solver"]


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


BACKENDS: dict[str, Backend] = {
    "brian2": Backend("brian2", "euler", 1, "numpy", "mep_hw.settle.brian2_backend", "settle_brian2"),
    "brian2_cython": Backend("brian2_cython", "euler", 1, "cython", "mep_hw.settle.brian2_backend", "settle_brian2"),
}

SOLVER_NAMES: tuple[str, ...] = (*SOLVERS, *BACKENDS)


def check_solver(name: str) -> None:
    """Raise ConfigError unless ``name`` is a registered solver (a tableau or a backend)."""
    if name not in SOLVERS and name not in BACKENDS:
        raise ConfigError(f"unknown solver {name!r}; valid solvers: {', '.join(SOLVER_NAMES)}")


def get_backend(name: str) -> Backend | None:
    """The backend registered under ``name``, or None for a tableau; unknown names list the
    valid ones."""
    check_solver(name)
    return BACKENDS.get(name)


def get_solver(name: str) -> Tableau:
    """The tableau registered under ``name``; unknown names list the valid ones."""
    check_solver(name)
    try:
        return SOLVERS[name]
    except KeyError:
        raise ConfigError(
            f"solver {name!r} is a backend ({BACKENDS[name].module}), not a Runge–Kutta tableau of the "
            f"torch engine; use one of {', '.join(SOLVERS)} here"
        ) from None

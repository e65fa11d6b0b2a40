"""The ODE settling engine: fixed-step and adaptive Runge–Kutta solvers, steady-state stop, and
backends (Brian2) behind the same ``settle`` call."""

from mep_hw.settle.engine import Dynamics, SettleConfig, SettleResult, SettleStatus, integrate, settle
from mep_hw.settle.solvers import BACKENDS, SOLVER_NAMES, SOLVERS, Backend, Tableau, get_backend, get_solver

__all__ = [
    "BACKENDS", "Backend", "Dynamics", "SOLVERS", "SOLVER_NAMES", "SettleConfig", "SettleResult", "SettleStatus",
    "Tableau", "get_backend", "get_solver", "integrate", "settle",
]

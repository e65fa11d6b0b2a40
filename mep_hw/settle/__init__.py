"""The ODE settling engine: fixed-step and adaptive Runge–Kutta solvers, steady-state stop."""

from mep_hw.settle.engine import Dynamics, SettleConfig, SettleResult, SettleStatus, integrate, settle
from mep_hw.settle.solvers import SOLVERS, Tableau, get_solver

__all__ = ["Dynamics", "SOLVERS", "SettleConfig", "SettleResult", "SettleStatus", "Tableau", "get_solver", "integrate", "settle"]

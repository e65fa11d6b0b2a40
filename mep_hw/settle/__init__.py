"""The settling engine: fixed-step and adaptive Runge–Kutta solvers, the block-exact sweep,
steady-state stop, and backends (Brian2) behind the same ``settle`` call."""

from mep_hw.settle.engine import (
    BlockDynamics, Dynamics, SettleConfig, SettleResult, SettleStatus, integrate, remedy, settle,
)
from mep_hw.settle.solvers import (
    BACKENDS, SOLVER_NAMES, SOLVERS, SWEEPS, Backend, Sweep, Tableau, evals_per_step, get_backend, get_solver,
    get_sweep,
)

__all__ = [
    "BACKENDS", "Backend", "BlockDynamics", "Dynamics", "SOLVERS", "SOLVER_NAMES", "SWEEPS", "SettleConfig",
    "SettleResult", "SettleStatus", "Sweep", "Tableau", "evals_per_step", "get_backend", "get_solver", "get_sweep",
    "integrate", "remedy", "settle",
]

"""Each solver's order of convergence on a linear ODE with a closed-form solution."""

import numpy as np
import pytest
import scipy.linalg
import torch

from mep_hw.errors import ConfigError
from mep_hw.settle import SOLVERS, get_solver, integrate
from mep_hw.settle.engine import rk_step

A = torch.tensor([[-1.0, 2.0, 0.0], [-2.0, -1.0, 0.5], [0.0, -0.5, -0.3]], dtype=torch.float64)
Y0 = torch.tensor([[1.0, -0.5, 0.25]], dtype=torch.float64)


def exact(t):
    return torch.from_numpy(scipy.linalg.expm(A.numpy() * t)) @ Y0[0]


def field(y):
    return y @ A.T


def observed_order(solver, steps, t_end=1.0):
    errs = [float((integrate(field, Y0, t_end, n, solver)[0] - exact(t_end)).norm()) for n in steps]
    return np.polyfit(np.log(1.0 / np.array(steps)), np.log(errs), 1)[0], errs


@pytest.mark.parametrize(
    "solver,steps",
    [
        ("euler", [40, 80, 160, 320]),
        ("heun", [20, 40, 80, 160]),
        ("rk4", [8, 16, 32, 64]),
        ("bosh3", [10, 20, 40, 80]),
        ("dopri5", [4, 8, 16, 32]),
    ],
)
def test_order_of_convergence(solver, steps):
    order, errs = observed_order(solver, steps)
    expected = get_solver(solver).order
    assert abs(order - expected) < 0.25, (solver, order, errs)
    assert errs[-1] < errs[0]


@pytest.mark.parametrize("solver", ["bosh3", "dopri5"])
def test_embedded_solution_has_the_lower_order(solver):
    # ŷ = y_new − h Σ (b_j − b̂_j) k_j, built from the stages of real steps (for a first-same-as-
    # last pair the last stage is f at the higher-order solution).
    tab = get_solver(solver)
    errs = []
    steps = [8, 16, 32, 64]
    for n in steps:
        h, y = 1.0 / n, Y0
        for _ in range(n):
            y_new, ks = rk_step(field, tab, y, field(y), h)
            y = y_new - h * sum(e * k for e, k in zip(tab.b_err, ks))
        errs.append(float((y[0] - exact(1.0)).norm()))
    order = np.polyfit(np.log(1.0 / np.array(steps)), np.log(errs), 1)[0]
    assert abs(order - tab.err_order) < 0.3, (order, errs)


def test_tableaus_are_consistent():
    for tab in SOLVERS.values():
        assert abs(sum(tab.b) - 1.0) < 1e-12, tab.name
        for i, row in enumerate(tab.a):
            assert len(row) == i
        if tab.adaptive:
            assert abs(sum(tab.b_err)) < 1e-12, tab.name  # both solutions are consistent


def test_unknown_solver_lists_the_valid_ones():
    from mep_hw.settle import SOLVER_NAMES

    with pytest.raises(ConfigError, match="valid solvers: " + ", ".join(SOLVER_NAMES) + "$"):  # every registered one
        get_solver("rk45")

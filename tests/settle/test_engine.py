"""The settling engine: steady states, per-sample stop, statuses and their errors."""

import math

import pytest
import torch

from mep_hw.errors import ConfigError, SettleError
from mep_hw.settle import SettleConfig, SettleStatus, settle


class Linear:
    """ds/dt = −K (s − s*) per sample, with per-sample rates K (a (batch, 1) tensor)."""

    box = None

    def __init__(self, rates, target, log=None):
        self.rates, self.target, self.sizes, self.log = rates, target, (target.shape[1],), log

    def field(self, s):
        if self.log is not None:
            self.log.append(s.shape[0])
        return -(s - self.target) * self.rates

    def restrict(self, index):
        return Linear(self.rates[index], self.target[index], self.log)


def linear_problem(B=6, n=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    rates = torch.linspace(0.2, 1.0, B, dtype=dtype).unsqueeze(1)
    target = torch.rand(B, n, generator=g, dtype=dtype)
    return Linear(rates, target), [torch.zeros(B, n, dtype=dtype)]


@pytest.mark.parametrize("solver", ["euler", "heun", "rk4", "bosh3", "dopri5"])
def test_reaches_the_closed_form_steady_state(solver):
    dyn, init = linear_problem()
    cfg = SettleConfig(solver=solver, dt=0.5, atol=1e-10, rtol=0, max_steps=2000, err_atol=1e-8, err_rtol=1e-8)
    res = settle(dyn, init, cfg)
    assert res.converged
    # residual ‖K(s − s*)‖ ≤ tol  ⇒  ‖s − s*‖ ≤ tol / K
    err = (res.states[0] - dyn.target).norm(dim=1)
    assert (err <= 1e-10 * math.sqrt(4) / dyn.rates.squeeze(1) * 1.001).all()
    assert (res.residual <= 1e-10 * 1.001).all()


def test_each_sample_stops_on_its_own_and_leaves_the_batch():
    log = []
    dyn, init = linear_problem(B=8)
    dyn.log = log
    # compact_work=0: take finished rows out at once however little work they cost (by default
    # rows this cheap are never worth the index operations; the results are the same either way)
    res = settle(dyn, init, SettleConfig(dt=0.5, atol=1e-8, rtol=0, max_steps=500), compact_work=0)
    # slow samples (small rate) need more steps than fast ones
    assert (res.steps[1:] <= res.steps[:-1]).all() and res.steps[0] > res.steps[-1]
    # finished samples cost nothing: the field saw fewer rows than 8 × the slowest sample's steps
    assert sum(log) < 8 * (int(res.steps.max()) + 1)
    assert sorted(set(log), reverse=True)[0] == 8 and min(log) == 1
    # a sample's result is independent of whom it shared the batch with
    for i in range(8):
        one = Linear(dyn.rates[i : i + 1], dyn.target[i : i + 1])
        alone = settle(one, [init[0][i : i + 1]], SettleConfig(dt=0.5, atol=1e-8, rtol=0, max_steps=500))
        assert torch.equal(alone.states[0][0], res.states[0][i])
        assert alone.steps[0] == res.steps[i]


def test_steps_equal_the_analytic_count_for_euler():
    # Euler on ds/dt = −k(s − s*) from 0: ‖f_n‖ = k‖s*‖(1 − k dt)^n
    dyn, init = linear_problem(B=3)
    cfg = SettleConfig(dt=0.5, atol=1e-6, rtol=0, max_steps=1000)
    res = settle(dyn, init, cfg)
    for i in range(3):
        k = float(dyn.rates[i])
        f0 = k * float(dyn.target[i].norm())
        n = math.ceil(math.log(1e-6 * 2 / f0) / math.log(1 - k * 0.5))
        assert int(res.steps[i]) == n
        assert float(res.time[i]) == pytest.approx(0.5 * n)


def test_step_limit_is_reported_with_a_remedy():
    dyn, init = linear_problem()
    with pytest.raises(SettleError, match="STEP_LIMIT.*raise max_steps") as e:
        settle(dyn, init, SettleConfig(dt=0.1, atol=1e-12, rtol=0, max_steps=5))
    res = e.value.result
    assert (res.status == SettleStatus.STEP_LIMIT).all() and (res.steps == 5).all()
    res2 = settle(dyn, init, SettleConfig(dt=0.1, atol=1e-12, rtol=0, max_steps=5), throw=False)
    assert torch.equal(res2.states[0], res.states[0])


def test_a_diverging_settle_is_nonfinite_and_raises():
    rates = torch.tensor([[-50.0], [1.0]], dtype=torch.float64)  # first sample grows e^{50t}
    dyn = Linear(rates, torch.ones(2, 3, dtype=torch.float64))
    res = settle(dyn, [torch.zeros(2, 3, dtype=torch.float64)], SettleConfig(dt=1.0, max_steps=500), throw=False)
    assert res.status.tolist() == [SettleStatus.NONFINITE, SettleStatus.CONVERGED]
    with pytest.raises(SettleError, match="NONFINITE.*diverged: lower dt"):
        settle(dyn, [torch.zeros(2, 3, dtype=torch.float64)], SettleConfig(dt=1.0, max_steps=500))


def test_rtol_scales_with_the_state_norm():
    dyn, init = linear_problem(B=2)
    loose = settle(dyn, init, SettleConfig(dt=0.5, atol=0, rtol=1e-2, max_steps=1000))
    tight = settle(dyn, init, SettleConfig(dt=0.5, atol=0, rtol=1e-6, max_steps=1000))
    assert (loose.steps < tight.steps).all()
    snorm = loose.states[0].norm(dim=1) / 2.0  # rms over 4 components
    assert (loose.residual <= 1e-2 * snorm * 1.0001).all()


def test_adaptive_solver_takes_larger_steps_than_its_first():
    dyn, init = linear_problem(B=2)
    cfg = SettleConfig(solver="dopri5", dt=0.01, atol=1e-8, rtol=0, max_steps=1000, err_atol=1e-6, err_rtol=1e-6)
    res = settle(dyn, init, cfg)
    fixed = settle(dyn, init, SettleConfig(solver="euler", dt=0.01, atol=1e-8, rtol=0, max_steps=100000))
    assert res.converged and (res.steps < fixed.steps / 10).all()
    assert (res.time > 0).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"solver": "nope"}, "unknown solver 'nope'; valid solvers"),
        ({"dt": 0.0}, "dt=0.0 must be a finite number > 0"),
        ({"dt": float("nan")}, "dt=nan"),
        ({"atol": -1.0}, "atol=-1.0 must be a finite number ≥ 0"),
        ({"atol": 0.0, "rtol": 0.0}, "both 0"),
        ({"max_steps": 0}, "max_steps=0 must be an integer ≥ 1"),
        ({"max_steps": 2.5}, "max_steps=2.5"),
    ],
)
def test_bad_settle_config_is_a_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SettleConfig(**kwargs)


def test_wrong_initial_shapes_are_rejected():
    dyn, _ = linear_problem()
    with pytest.raises(ConfigError, match="layer widths"):
        settle(dyn, [torch.zeros(6, 5, dtype=torch.float64)])


def test_small_cpu_settles_run_on_one_thread_and_restore_the_count(monkeypatch):
    """A settle whose sweep is small work runs on one intra-op thread (faster there, measured) and
    gives the same result; the caller's thread count is restored, also when the settle raises;
    a large one keeps the caller's threads."""
    import importlib

    eng = importlib.import_module("mep_hw.settle.engine")
    seen = []
    dyn, init = linear_problem()
    field = dyn.field

    def spy(s):  # the thread count the settle's own work runs at
        seen.append(torch.get_num_threads())
        return field(s)

    dyn.field = spy
    dyn.row_work = 40.0  # 6 rows × 40: small (a dynamics that does not say counts as large)
    cfg = SettleConfig(solver="euler", dt=0.5, atol=1e-10, rtol=0, max_steps=2000)
    n0 = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = eng.settle(dyn, init, cfg)
        assert seen[-1] == 1 and torch.get_num_threads() == 2
        monkeypatch.setattr(eng, "ONE_THREAD_WORK", 0.0)  # everything is "large"
        b = eng.settle(dyn, init, cfg)
        assert seen[-1] == 2
        assert torch.equal(a.states[0], b.states[0])
        monkeypatch.setattr(eng, "ONE_THREAD_WORK", math.inf)
        with pytest.raises(SettleError):
            eng.settle(dyn, init, SettleConfig(solver="euler", dt=0.5, atol=1e-10, rtol=0, max_steps=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n0)

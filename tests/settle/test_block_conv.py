"""The block solver on convolutional Hopfield networks: red-black sweeps over the layers of a
conv net reach the ODE's fixed points, never increase F (exact block minimisation with average
pooling, majorise–minimise through the arg-max with max pooling), stop where the ODE's field is
small, and give the EP gradient of the ODE settle."""

import math

import pytest
import torch

from mep_hw import EPConfig, ep_gradients
from mep_hw.settle import SettleConfig, settle
from mep_hw.train import TrainConfig
from tests.model.test_conv import batch, conv_net

F64 = torch.float64
TIGHT = dict(atol=1e-12, rtol=0.0, max_steps=5000)
ARCH = "conv:3:3:1,{p},conv:4:3,{p},fc:6,fc:4"


def scaled(arch, cost, scale, seed=1):
    m = conv_net(arch, activation="hard_sigmoid", cost=cost, seed=seed)
    with torch.no_grad():
        for w in m.weights:
            w.mul_(scale)
    return m


def dyn_of(m, x, y, beta):
    return m.dynamics(x) if isinstance(beta, float) and beta == 0.0 else m.dynamics(x, beta=beta, target=y)


def total_energy(m, x, s, beta, y):
    f = m.energy(x, s)
    return f if beta == 0.0 else f + beta * m.cost_fn(s, y)


@pytest.mark.parametrize("pool", ["pool:2", "avgpool:2"])
@pytest.mark.parametrize("cost", ["mse", "ce"])
@pytest.mark.parametrize("beta", [0.0, 0.5, -0.5])
def test_conv_block_sweeps_reach_the_odes_fixed_point(pool, cost, beta):
    # a contraction (weights scaled down): one fixed point, reached by the sweeps and by the ODE
    m = scaled(ARCH.format(p=pool), cost, 0.5)
    x, y = batch(m, B=4)
    dyn = dyn_of(m, x, y, beta)
    init = m.forward_init(m.dynamics(x))
    blk = settle(dyn, init, SettleConfig(solver="block", **TIGHT))
    assert blk.converged
    for solver in ("euler", "dopri5"):
        ode = settle(dyn, init, SettleConfig(solver=solver, dt=0.5, err_atol=1e-12, err_rtol=1e-10, **TIGHT))
        for a, b in zip(blk.states, ode.states):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    s = torch.cat(blk.states, 1)
    assert 0 < int(((s > 0) & (s < 1)).sum()) < s.numel()  # units inside and at the box bounds
    assert blk.steps.double().mean() < ode.steps.double().mean()


@torch.no_grad()
@pytest.mark.parametrize("pool", ["pool:2", "avgpool:2"])
@pytest.mark.parametrize("cost,beta", [("mse", 0.0), ("mse", 0.5), ("ce", 0.0)])
def test_conv_half_sweeps_never_increase_the_energy(pool, cost, beta):
    # full-scale weights (not a contraction; max-pool arg-maxes switch during the settle): exact
    # block minimisation with average pooling, majorise–minimise with max pooling
    m = scaled(ARCH.format(p=pool), cost, 2.0, seed=4)
    x, y = batch(m, B=6)
    dyn = dyn_of(m, x, y, beta)
    s = [torch.rand_like(t, dtype=F64) for t in m.zero_init(x)]
    F = [total_energy(m, x, s, beta, y)]
    for _ in range(15):
        for p in (1, 0) if (len(s) - 1) % 2 else (0, 1):
            dyn.block_update(s, p)
            F.append(total_energy(m, x, s, beta, y))
    dF = torch.stack(F[1:]) - torch.stack(F[:-1])
    assert float(dF.max()) <= 1e-12 and float(F[-1].sum()) < float(F[0].sum()) - 1e-3
    if pool == "avgpool:2":  # exact: after its update the parity updated last has a zero block field
        out = [torch.full_like(t, float("nan")) for t in s]
        dyn.block_field(s, p, out)
        assert max(float(out[l].abs().max()) for l in range(p, len(s), 2)) <= 1e-14


@pytest.mark.parametrize("cost", ["mse", "ce"])
def test_what_depends_on_itself_is_declared(cost):
    # the engine reads a self-coupled second parity's residual as its last step. States: conv 1
    # (below the max-pooled conv 2: its arg-max), conv 2 (below an fc), fc 6, and fc 4 for mse
    mx, av = scaled(ARCH.format(p="pool:2"), cost, 1.0), scaled(ARCH.format(p="avgpool:2"), cost, 1.0)
    x, y = batch(mx)
    assert mx.dynamics(x).block_self_coupled(0) and not mx.dynamics(x).block_self_coupled(1)
    assert not av.dynamics(x).block_self_coupled(0) and not av.dynamics(x).block_self_coupled(1)
    last = (len(av.state_sizes) - 1) % 2  # ce: fc 6 (parity 0), mse: fc 4 (parity 1)
    assert av.dynamics(x, beta=0.5, target=y).block_self_coupled(last) == (cost == "ce")  # the readout's softmax
    assert not av.dynamics(x, beta=0.5, target=y).block_self_coupled(1 - last)
    if cost == "mse":  # 1 + β ≤ 0: F concave in the output, its step is the field's
        assert av.dynamics(x, beta=-1.5, target=y).block_self_coupled(last)


@pytest.mark.parametrize("atol", [1e-5, 1e-8])
def test_a_converged_conv_block_settle_has_a_small_ode_field(atol):
    # max pooling (arg-maxes switch at these weights): at the state returned, the ODE field of
    # every converged sample is within a small factor of the tolerance
    m = scaled(ARCH.format(p="pool:2"), "ce", 1.5, seed=2)
    x, y = batch(m, B=20)
    beta = torch.cat([torch.full((10, 1), 0.5, dtype=F64), torch.full((10, 1), -0.5, dtype=F64)])
    for dyn in (m.dynamics(x), m.dynamics(x, beta=beta, target=y)):
        res = settle(dyn, m.forward_init(m.dynamics(x)), SettleConfig(solver="block", atol=atol, rtol=0.0, max_steps=3000))
        s = torch.cat(res.states, 1)
        rms_f = torch.linalg.vector_norm(dyn.field(s), dim=1) / math.sqrt(s.shape[1])
        ok = res.status == 0
        assert int(ok.sum()) >= 18
        assert float(rms_f[ok].max()) <= 3 * atol, (rms_f[ok].max(), atol)


def test_conv_ep_gradients_through_sweeps_equal_the_ode_settles():
    # at weights scaled by 0.5 the fixed point is unique; at 0.7 the max-pooled energy has several
    # and the sweeps may settle in another one than the ODE (both converged, 0.012 apart)
    m = scaled(ARCH.format(p="pool:2"), "ce", 0.5)
    x, y = batch(m, B=5)
    tight = dict(atol=1e-11, rtol=0.0, max_steps=4000)
    grads = {}
    for solver in ("block", "euler"):
        sc = SettleConfig(solver=solver, dt=0.5 if solver == "euler" else 1.0, **tight)
        grads[solver] = ep_gradients(m, x, y, EPConfig(beta=0.2, estimator="symmetric", free=sc, nudged=sc)).grads
    for a, b in zip(grads["block"], grads["euler"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_train_config_takes_the_block_solver_for_a_conv_net():
    cfg = TrainConfig(solver="block", arch="conv:4:3,pool:2,fc:10", cost="ce")
    assert cfg.settle_solver == "block" and cfg.ep_config().free.solver == "block"


def test_a_sweep_reads_each_array_as_often_as_an_euler_step(monkeypatch):
    # the max-pool arg-max below a layer comes from the other parity's forward read of it
    from mep_hw.model.conv import ConvDynamics

    m = scaled(ARCH.format(p="pool:2"), "ce", 1.0)
    x, y = batch(m, B=4)
    calls = {"up": 0, "down": 0}
    up, down = ConvDynamics._up, ConvDynamics._down

    def count(name, fn):
        def wrapped(self, *a, **k):
            calls[name] += 1
            return fn(self, *a, **k)
        return wrapped

    monkeypatch.setattr(ConvDynamics, "_up", count("up", up))
    monkeypatch.setattr(ConvDynamics, "_down", count("down", down))
    per_step = {}
    for solver in ("block", "euler"):
        dyn = m.dynamics(x, beta=0.3, target=y)
        init = m.forward_init(m.dynamics(x))
        for k in calls:
            calls[k] = 0
        res = settle(dyn, init, SettleConfig(solver=solver, atol=1e-14, rtol=0.0, max_steps=12), throw=False)
        assert (res.steps == 12).all()
        before = dict(calls)
        settle(dyn, init, SettleConfig(solver=solver, atol=1e-14, rtol=0.0, max_steps=24), throw=False)
        per_step[solver] = {k: (calls[k] - 2 * before[k]) / 12 for k in calls}  # the 12 extra steps
    assert per_step["block"] == per_step["euler"] == {"up": 2.0, "down": 2.0}, per_step


def test_with_one_self_coupled_parity_the_residual_is_the_odes_field():
    # free phase of the max-pooled net: only conv 1 depends on itself; its parity goes first, so
    # the other parity's residual is exactly 0 after its update and the reported residual is the
    # ODE field at the returned state — after every number of sweeps, also while arg-maxes switch
    m = scaled(ARCH.format(p="pool:2"), "mse", 1.5, seed=2)  # 4 states: the last parity (1) is not self-coupled
    x, _ = batch(m, B=12)
    dyn = m.dynamics(x)
    for steps in (1, 2, 3, 5, 3000):
        res = settle(dyn, m.forward_init(dyn), SettleConfig(solver="block", atol=1e-12, rtol=0.0, max_steps=steps), throw=False)
        s = torch.cat(res.states, 1)
        rms_f = torch.linalg.vector_norm(dyn.field(s), dim=1) / math.sqrt(s.shape[1])
        torch.testing.assert_close(res.residual, rms_f, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("compact_work", [0.0, math.inf])
def test_both_parities_self_coupled_reach_the_odes_fixed_point(compact_work):
    # two conv states under a CE readout: conv 1 depends on itself through conv 2's max pooling,
    # conv 2 through the nudged readout — the second parity's residual is its last step (the
    # fixed-point test); with rows taken out of the batch (compact_work 0) or masked in it (inf)
    m = scaled("conv:3:3:1,pool:2,conv:4:3,pool:2,fc:4", "ce", 1.0, seed=1)  # (seed 3 at ×0.5: another fixed point)
    x, y = batch(m, B=10)
    beta = torch.cat([torch.full((5, 1), 0.5, dtype=F64), torch.full((5, 1), -0.5, dtype=F64)])
    dyn = m.dynamics(x, beta=beta, target=y)
    assert dyn.block_self_coupled(0) and dyn.block_self_coupled(1)
    init = m.forward_init(m.dynamics(x))
    blk = settle(dyn, init, SettleConfig(solver="block", atol=1e-11, rtol=0.0, max_steps=3000), compact_work=compact_work)
    ode = settle(dyn, init, SettleConfig(solver="dopri5", dt=0.5, err_atol=1e-12, err_rtol=1e-10, **TIGHT))
    for a, b in zip(blk.states, ode.states):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    s = torch.cat(blk.states, 1)
    rms_f = torch.linalg.vector_norm(dyn.field(s), dim=1) / math.sqrt(s.shape[1])
    assert float(rms_f.max()) <= 3e-11
    assert len(set(blk.steps.tolist())) > 1  # rows finish at different sweeps: frozen / taken out


def test_the_lagged_residual_is_the_first_paritys_field_and_the_seconds_last_step():
    # both parities self-coupled (conv 2 goes first, as the last layer): after k sweeps the
    # reported residual is rms of [f_conv2(s_k), s_conv1(k) − s_conv1(k − 1)]
    m = scaled("conv:3:3:1,pool:2,conv:4:3,pool:2,fc:4", "ce", 1.0, seed=1)
    x, y = batch(m, B=6)
    dyn = m.dynamics(x, beta=0.5, target=y)
    init = m.forward_init(m.dynamics(x))
    n0 = m.state_sizes[0]

    def run(k):
        return settle(dyn, init, SettleConfig(solver="block", atol=1e-14, rtol=0.0, max_steps=k), throw=False)

    for k in (2, 3, 4):
        a, b = run(k - 1), run(k)
        s = torch.cat(b.states, 1)
        f1 = dyn.field(s)[:, n0:]
        step2 = b.states[0] - a.states[0]
        assert float(step2.abs().max()) > 1e-6  # the second parity still moves
        want = torch.sqrt((f1 ** 2).sum(1) + (step2 ** 2).sum(1)) / math.sqrt(s.shape[1])
        torch.testing.assert_close(b.residual, want, rtol=1e-9, atol=1e-15)

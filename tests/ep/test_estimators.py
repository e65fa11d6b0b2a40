"""EP estimates → the gradient of the loss at the fixed point (implicit differentiation)."""

import numpy as np
import pytest
import torch

from mep_hw.ep import EPConfig, assign_grads, ep_gradients
from mep_hw.errors import ConfigError, SettleError
from mep_hw.model import LayeredHopfield, one_hot
from mep_hw.settle import SettleConfig, settle

F64 = torch.float64
TIGHT = SettleConfig(solver="rk4", dt=0.5, atol=1e-13, rtol=0, max_steps=20000)


def small_net(activation="sigmoid", cost="mse", seed=0):
    m = LayeredHopfield((6, 7, 5, 4), activation=activation, cost=cost, generator=torch.Generator().manual_seed(seed), dtype=F64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for w in m.weights:
            w.mul_(0.8)
        for b in m.biases:
            b.uniform_(0.2, 0.6, generator=g)
    x = torch.rand(5, 6, generator=g, dtype=F64)
    y = one_hot(torch.randint(0, 4, (5,), generator=g), 4, F64)
    return m, x, y


def implicit_gradient(m, x, y):
    """dL/dθ of L = mean_b C(s*_b) through the free fixed point s*, by the implicit function
    theorem: dL/dθ = ∂C/∂θ − λᵀ ∂²E/∂s∂θ with H λ = ∂C/∂s, H = ∂²E/∂s². Units pinned at the
    box bounds do not move with θ and are left out of H."""
    res = settle(m.dynamics(x), m.zero_init(x), TIGHT)
    sizes = list(m.state_sizes)
    flat = torch.cat(res.states, 1).reshape(-1).detach()
    free = torch.ones_like(flat, dtype=torch.bool)
    if m.act.box is not None:
        free = (flat > 1e-9) & (flat < 1 - 1e-9)

    def split(v):
        return list(v.reshape(x.shape[0], -1).split(sizes, 1))

    H = torch.autograd.functional.hessian(lambda v: m.energy(x, split(v)).sum(), flat)
    v = flat.clone().requires_grad_(True)
    dC = torch.autograd.grad(m.cost_fn(split(v), y).mean(), v)[0]
    lam = torch.zeros_like(flat)
    lam[free] = torch.linalg.solve(H[free][:, free], dC[free])
    v = flat.clone().requires_grad_(True)
    dE = torch.autograd.grad(m.energy(x, split(v)).sum(), v, create_graph=True)[0]
    obj = m.cost_fn(split(flat), y).mean() - (dE * lam).sum()
    params = m.param_list()
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(torch.autograd.grad(obj, params, allow_unused=True), params)]


def rel_err(a, b):
    num = sum(float(((u - v) ** 2).sum()) for u, v in zip(a, b))
    return (num / sum(float((v**2).sum()) for v in b)) ** 0.5


@pytest.mark.slow
@pytest.mark.parametrize("cost", ["mse", "ce"])
@pytest.mark.parametrize("estimator,slope", [("one-sided", 1.0), ("symmetric", 2.0)])
def test_ep_converges_to_the_implicit_gradient_with_the_right_order(cost, estimator, slope):
    m, x, y = small_net(cost=cost)
    ref = implicit_gradient(m, x, y)
    betas = np.array([0.2, 0.1, 0.05, 0.025, 0.0125])
    errs = []
    for beta in betas:
        cfg = EPConfig(beta=float(beta), estimator=estimator, init="zeros", free=TIGHT, nudged=TIGHT, strict=True)
        errs.append(rel_err(ep_gradients(m, x, y, cfg).grads, ref))
    fitted = np.polyfit(np.log(betas), np.log(errs), 1)[0]
    assert abs(fitted - slope) < 0.15, (fitted, errs)
    assert errs[-1] < (3e-2 if estimator == "one-sided" else 1e-3)


def test_hard_sigmoid_symmetric_estimate_matches_the_implicit_gradient():
    m, x, y = small_net(activation="hard_sigmoid")
    ref = implicit_gradient(m, x, y)
    cfg = EPConfig(beta=1e-3, estimator="symmetric", init="zeros", free=TIGHT, nudged=TIGHT, strict=True)
    assert rel_err(ep_gradients(m, x, y, cfg).grads, ref) < 1e-5


@pytest.mark.slow
def test_stacked_symmetric_phases_equal_two_separate_settles():
    m, x, y = small_net()
    cfg = EPConfig(beta=0.3, init="zeros", free=TIGHT, nudged=TIGHT)
    r = ep_gradients(m, x, y, cfg)
    free = settle(m.dynamics(x), m.zero_init(x), TIGHT)
    plus = settle(m.dynamics(x, beta=0.3, target=y), free.states, TIGHT)
    minus = settle(m.dynamics(x, beta=-0.3, target=y), free.states, TIGHT)
    for a, b in zip(r.nudged[0].states + r.nudged[1].states, plus.states + minus.states):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


@pytest.mark.slow
def test_grads_go_into_dot_grad_and_a_host_optimizer_lowers_the_loss():
    m, x, y = small_net()
    cfg = EPConfig(beta=0.1, init="zeros", free=TIGHT, nudged=TIGHT)
    opt = torch.optim.SGD(m.param_list(), lr=1.0)
    losses = []
    for _ in range(40):
        r = ep_gradients(m, x, y, cfg)
        losses.append(float(r.loss.mean()))
        opt.zero_grad()
        assign_grads(m.param_list(), r.grads)
        assert all(p.grad is g or torch.equal(p.grad, g) for p, g in zip(m.param_list(), r.grads))
        opt.step()
    assert losses[-1] < 0.7 * losses[0]  # the smooth output cannot reach one-hot targets: a floor


def test_random_sign_follows_the_generator():
    m, x, y = small_net()
    cfg = EPConfig(beta=0.2, estimator="one-sided", random_sign=True, init="zeros", free=TIGHT, nudged=TIGHT)
    a = ep_gradients(m, x, y, cfg, generator=torch.Generator().manual_seed(4)).grads
    b = ep_gradients(m, x, y, cfg, generator=torch.Generator().manual_seed(4)).grads
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf")])
def test_beta_must_be_positive(beta):
    with pytest.raises(ConfigError, match="beta=.* must be a finite number > 0"):
        EPConfig(beta=beta)


def test_unknown_estimator_or_init_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="valid estimators: one-sided, symmetric"):
        EPConfig(estimator="centered")
    with pytest.raises(ConfigError, match="valid inits: forward, zeros"):
        EPConfig(init="random")


def test_a_diverging_settle_raises_with_the_result_attached():
    m, x, y = small_net(activation="sigmoid")
    # Euler with dt = 3 multiplies the leak term by 1 − 3 = −2 every step: the state overflows
    cfg = EPConfig(free=SettleConfig(dt=3.0, atol=1e-9, max_steps=5000), nudged=SettleConfig(dt=3.0))
    with pytest.raises(SettleError, match="free phase: NONFINITE") as e:
        ep_gradients(m, x, y, cfg)
    assert e.value.result is not None and e.value.result.status.numel() == 5


def test_strict_mode_raises_on_the_step_limit():
    m, x, y = small_net()
    cfg = EPConfig(free=SettleConfig(dt=0.1, atol=1e-12, rtol=0, max_steps=3), strict=True)
    with pytest.raises(SettleError, match="free phase: STEP_LIMIT"):
        ep_gradients(m, x, y, cfg)

"""The layered Hopfield energy: analytic field vs autograd, fixed points vs scipy, bad input."""

import numpy as np
import pytest
import scipy.optimize
import torch

from mep_hw.errors import ConfigError, DataError
from mep_hw.model import LayeredHopfield, one_hot
from mep_hw.settle import SettleConfig, settle

F64 = torch.float64


def net(layers=(5, 7, 6, 3), activation="sigmoid", cost="mse", seed=0, scale=1.0):
    m = LayeredHopfield(layers, activation=activation, cost=cost, generator=torch.Generator().manual_seed(seed), dtype=F64)
    with torch.no_grad():
        for w in m.weights:
            w.mul_(scale)
        for b in m.biases:
            b.uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(seed + 7))
    return m


def batch(m, B=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, m.layers[0], generator=g, dtype=F64)
    y = one_hot(torch.randint(0, m.layers[-1], (B,), generator=g), m.layers[-1], F64)
    return x, y


def autograd_dF(m, x, states, beta, y):
    s = [t.clone().requires_grad_(True) for t in states]
    F = m.energy(x, s).sum()
    if not (isinstance(beta, float) and beta == 0.0):
        F = F + (m.cost_fn(s, y) * torch.as_tensor(beta, dtype=F64).reshape(-1)).sum()
    return torch.autograd.grad(F, s)


@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("cost", ["mse", "ce"])
@pytest.mark.parametrize("beta", [0.0, 0.7, "per-sample"])
def test_analytic_gradient_equals_autograd(activation, cost, beta):
    m = net(activation=activation, cost=cost)
    x, y = batch(m)
    if beta == "per-sample":
        beta = torch.tensor([[0.5], [-0.5], [1.2], [-2.0]], dtype=F64)
    g = torch.Generator().manual_seed(11)
    states = [torch.rand(4, n, generator=g, dtype=F64) * 1.6 - 0.3 for n in m.state_sizes]  # in and out of [0, 1]
    dyn = m.dynamics(x, beta=beta, target=y)
    ours = dyn.grad_energy(states)
    ref = autograd_dF(m, x, states, beta, y)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cost", ["mse", "ce"])
@pytest.mark.parametrize("beta", [0.0, 0.4, -0.4, -1.5])
def test_box_field_is_the_scaled_projected_gradient(cost, beta):
    m = net(activation="hard_sigmoid", cost=cost)
    x, y = batch(m)
    g = torch.Generator().manual_seed(5)
    states = [torch.rand(4, n, generator=g, dtype=F64) for n in m.state_sizes]  # inside [0, 1]
    dyn = m.dynamics(x, beta=beta, target=y)
    field = dyn.field(torch.cat(states, 1)).split(list(m.state_sizes), 1)
    grads = autograd_dF(m, x, states, beta, y)
    for i, (f, s, dF) in enumerate(zip(field, states, grads)):
        D = 1.0 + beta if (cost == "mse" and i == len(states) - 1 and 1.0 + beta > 0) else 1.0
        torch.testing.assert_close(f, (s - dF / D).clamp(0, 1) - s, rtol=1e-12, atol=1e-12)


def _solve_fixed_point(m, x, beta, y):
    """The fixed point from scipy: a root of ∂F/∂s (smooth ρ) or F's minimiser on the box."""
    sizes = list(m.state_sizes)
    out = []
    for b in range(x.shape[0]):
        xb, yb = x[b : b + 1], y[b : b + 1]

        def F_and_grad(v):
            s = [t.requires_grad_(True) for t in torch.from_numpy(v).reshape(1, -1).split(sizes, 1)]
            F = (m.energy(xb, s) + beta * m.cost_fn(s, yb)).sum()
            g = torch.autograd.grad(F, s)
            return float(F.detach()), torch.cat(g, 1).reshape(-1).detach().numpy()

        v0 = np.full(sum(sizes), 0.5)
        if m.act.box is None:
            sol = scipy.optimize.root(lambda v: F_and_grad(v)[1], v0, jac=False, tol=1e-13)
            assert sol.success
        else:
            sol = scipy.optimize.minimize(
                F_and_grad, v0, jac=True, method="L-BFGS-B", bounds=[(0.0, 1.0)] * len(v0),
                options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000},
            )
        out.append(sol.x)
    return torch.from_numpy(np.stack(out))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_settled_state_is_scipys_fixed_point(seed, activation, beta):
    # scaled so the coupling is contractive: the fixed point is unique
    m = net(layers=(6, 8, 5, 3), activation=activation, seed=seed, scale=0.6)
    x, y = batch(m, seed=seed)
    dyn = m.dynamics(x, beta=beta, target=y)
    cfg = SettleConfig(solver="rk4", dt=0.5, atol=1e-12, rtol=0, max_steps=5000)
    res = settle(dyn, m.zero_init(x), cfg)
    ours = torch.cat(res.states, 1)
    ref = _solve_fixed_point(m, x, beta, y)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-7)


def test_forward_init_is_the_bottom_up_pass():
    m = net(activation="hard_sigmoid")
    x, _ = batch(m)
    s = m.forward_init(m.dynamics(x))
    h = (x @ m.weights[0].T + m.biases[0]).clamp(0, 1)
    torch.testing.assert_close(s[0], h)
    torch.testing.assert_close(s[1], (h @ m.weights[1].T + m.biases[1]).clamp(0, 1))


def test_ep_contrast_is_the_difference_of_dF_dtheta():
    m = net(activation="sigmoid", cost="ce")
    x, y = batch(m)
    g = torch.Generator().manual_seed(9)
    sa = [torch.rand(4, n, generator=g, dtype=F64) for n in m.state_sizes]
    sb = [torch.rand(4, n, generator=g, dtype=F64) for n in m.state_sizes]

    def dF_dtheta(s, beta):
        m.zero_grad()
        ((m.energy(x, s) + beta * m.cost_fn(s, y)).mean()).backward()
        return [p.grad.clone() for p in m.param_list()]

    ours = m.ep_contrast(x, sa, 0.3, sb, -0.2, y)
    ref = [(a - b) / 0.5 for a, b in zip(dF_dtheta(sa, 0.3), dF_dtheta(sb, -0.2))]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bad_shapes_and_values_raise_typed_errors():
    m = net()
    x, y = batch(m)
    with pytest.raises(ConfigError, match=r"input x has shape \(4, 4\) but the network expects \(batch, 5\)"):
        m.dynamics(x[:, :4])
    with pytest.raises(ConfigError, match="target has shape"):
        m.dynamics(x, beta=0.5, target=y[:, :2])
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(DataError, match=r"input x contains NaN or infinite values \(samples \[2\]"):
        m.dynamics(bad)
    with pytest.raises(ConfigError, match="needs a target"):
        m.dynamics(x, beta=0.5)
    with pytest.raises(ConfigError, match="not finite"):
        m.dynamics(x, beta=float("inf"), target=y)
    with pytest.raises(ConfigError, match="unknown activation 'relu'; valid activations: hard_sigmoid, sigmoid"):
        LayeredHopfield((3, 2), activation="relu")
    with pytest.raises(ConfigError, match="unknown cost"):
        LayeredHopfield((3, 2), cost="hinge")
    with pytest.raises(ConfigError, match="needs at least one hidden"):
        LayeredHopfield((3, 2), cost="ce")
    with pytest.raises(ConfigError, match="layers=.*invalid"):
        LayeredHopfield((3,))


def test_one_hot_is_torch_one_hot_without_its_host_reads():
    """one_hot scatters (F.one_hot reads the labels' min and max on the host: two synchronisations
    on CUDA); same values, and an out-of-range label still fails."""
    import torch.nn.functional as F

    from mep_hw.model import one_hot as oh

    y = torch.tensor([3, 0, 9, 9, 1])
    assert torch.equal(oh(y, 10), F.one_hot(y, 10).float())
    assert oh(y, 10, torch.float64).dtype == torch.float64
    with pytest.raises((RuntimeError, IndexError)):
        oh(torch.tensor([10]), 10)


def test_the_input_contrast_skips_unmoved_samples_and_keeps_the_sum():
    """Δᵀx over the rows of Δ that moved equals the dense product (another summation order), with
    no row, a few, or most moved; a NaN row is kept (it must reach the gradient)."""
    from mep_hw.model.hopfield import _moving_rows_product

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 30, generator=g)
    for moved in (0, 1, 5, 40, 64):
        d = torch.zeros(64, 20)
        rows = torch.randperm(64, generator=g)[:moved]
        d[rows] = torch.randn(moved, 20, generator=g)
        d[rows[: moved // 2], :7] = 0.0  # partly unmoved rows still count
        torch.testing.assert_close(_moving_rows_product(d, x), d.T @ x, rtol=1e-5, atol=1e-5)
    d = torch.zeros(64, 20)
    d[3, 4] = float("nan")
    assert torch.isnan(_moving_rows_product(d, x)[4]).all()


def test_one_sided_ep_gradients_do_not_depend_on_skipping_unmoved_samples(monkeypatch):
    """The EP estimate with the sparse input contrast equals the dense one (float64, 1e-12)."""
    import mep_hw.model.hopfield as H
    from mep_hw.ep import EPConfig, ep_gradients

    m = LayeredHopfield((12, 16, 4), generator=torch.Generator().manual_seed(2), dtype=F64)
    x, y = batch(m, B=32)
    cfg = EPConfig(beta=0.5, estimator="one-sided", free=SettleConfig(solver="block", atol=1e-8, max_steps=500),
                   nudged=SettleConfig(solver="block", atol=1e-4, max_steps=500))
    free = settle(m.dynamics(x), m.forward_init(m.dynamics(x)), cfg.free)
    y = y.clone()
    y[:20] = free.states[-1][:20]  # these samples' outputs are at their target: the nudge does not move them
    sparse = ep_gradients(m, x, y, cfg)
    assert int((sparse.nudged[0].steps == 0).sum()) >= 20  # the sparse path runs
    monkeypatch.setattr(H, "SPARSE_CONTRAST_FRAC", 1.1)  # never skip
    dense = ep_gradients(m, x, y, cfg)
    for a, b in zip(sparse.grads, dense.grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

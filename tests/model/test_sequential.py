"""The feedforward energy of an nn.Sequential: EP vs autograd, the preconditioned field,
locality, unsupported layers."""

import pytest
import torch
from torch import nn

from mep_hw.ep import EPConfig, ep_gradients
from mep_hw.errors import ConfigError, DataError
from mep_hw.model import FeedforwardEnergy
from mep_hw.settle import SettleConfig

F64 = torch.float64
TIGHT = SettleConfig(dt=1.0, atol=1e-13, rtol=0, max_steps=500)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.Softplus(), nn.Linear(7, 3)).double()


def cnn():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.Sigmoid(), nn.Linear(5, 4)
    ).double()


def batch(model, B=5):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, 6, generator=g, dtype=F64) if isinstance(model[0], nn.Linear) else torch.randn(B, 1, 8, 8, generator=g, dtype=F64)
    return x, torch.randint(0, model[-1].out_features, (B,), generator=g)


def backprop_grads(model, x, y, loss_type):
    model.zero_grad()
    out = model(x)
    if loss_type == "mse":
        loss = 0.5 * ((out - nn.functional.one_hot(y, out.shape[1]).to(F64)) ** 2).sum(1).mean()
    else:
        loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("make", [mlp, cnn])
@pytest.mark.parametrize("loss_type", ["mse", "cross_entropy"])
def test_ep_gradient_matches_autograd_for_small_beta(make, loss_type):
    model = make()
    x, y = batch(model)
    ref = backprop_grads(model, x, y, loss_type)
    energy = FeedforwardEnergy(model, loss_type)
    for beta, cos_min in ((1e-2, 0.9999), (1e-3, 0.999999)):
        r = ep_gradients(energy, x, y, EPConfig(beta=beta, free=TIGHT, nudged=TIGHT, strict=True))
        ep = torch.cat([g.flatten() for g in r.grads])
        cos = float(ep @ ref / (ep.norm() * ref.norm()))
        assert cos > cos_min, (beta, cos)
    assert float((ep - ref).norm() / ref.norm()) < 1e-4
    assert int(r.free.steps.max()) == 0  # the forward pass is the free fixed point


def test_field_is_the_gauss_newton_flow_to_first_order_with_the_same_fixed_points():
    model = mlp()
    x, y = batch(model, B=2)
    energy = FeedforwardEnergy(model, "mse")
    s0 = torch.cat(energy.forward_init(energy.dynamics(x)), 1)
    sizes = [8, 7, 3]

    def gauss_newton_field(dyn, beta, s, b):
        def F(z):
            s1, s2, s3 = z.split(sizes)
            e1, e2, e3 = s1 - dyn.first[b], s2 - model[3](model[2](s1)), s3 - model[4](s2)
            C = 0.5 * ((s3 - nn.functional.one_hot(y[b], 3).to(F64)) ** 2).sum()
            return 0.5 * (e1 @ e1 + e2 @ e2 + e3 @ e3) + beta * C
        grad = torch.func.grad(F)(s[b])
        J = torch.zeros(18, 18, dtype=F64)
        J[8:15, 0:8] = torch.func.jacrev(lambda z: model[3](model[2](z)))(s[b, :8])
        J[15:, 8:15] = torch.func.jacrev(model[4])(s[b, 8:15])
        A = torch.eye(18, dtype=F64) - J
        return -torch.linalg.solve(A.T @ A, grad)

    # from the free state both fields are O(β) and differ at O(β²)
    gaps = []
    for beta in (1e-2, 1e-3):
        dyn = energy.dynamics(x).nudge(beta, y)
        f = dyn.field(s0)
        gn = torch.stack([gauss_newton_field(dyn, beta, s0, b) for b in range(2)])
        assert float(f.norm()) > 0.1 * beta
        gaps.append(float((f - gn).detach().norm()))
    assert gaps[1] < gaps[0] / 50
    # and they vanish together at the nudged fixed point
    from mep_hw.settle import settle

    dyn = energy.dynamics(x).nudge(0.3, y)
    fixed = torch.cat(settle(dyn, list(s0.split(sizes, 1)), TIGHT).states, 1)
    assert float(dyn.field(fixed).abs().max()) < 1e-12
    assert max(float(gauss_newton_field(dyn, 0.3, fixed, b).detach().abs().max()) for b in range(2)) < 1e-10


def test_a_nudged_settle_takes_a_few_newton_steps():
    model = mlp()
    x, y = batch(model, B=32)
    energy = FeedforwardEnergy(model, "cross_entropy")
    r = ep_gradients(energy, x, y, EPConfig(beta=0.1, free=TIGHT, nudged=SettleConfig(dt=1.0, atol=1e-10, rtol=0, max_steps=50)))
    # linear convergence at about 0.03 per step from a displacement of order β: 7 steps to 1e-10
    assert r.nudged[0].converged and int(r.nudged[0].steps.max()) <= 8


def test_local_contrast_is_local_and_equals_the_global_one():
    model = mlp()
    x, y = batch(model)
    energy = FeedforwardEnergy(model, "cross_entropy")
    g = torch.Generator().manual_seed(4)
    sa = [torch.randn(5, n, generator=g, dtype=F64) for n in (8, 7, 3)]
    sb = [torch.randn(5, n, generator=g, dtype=F64) for n in (8, 7, 3)]
    energy.forward_states(x)
    glob = energy.ep_contrast(x, sa, 0.2, sb, -0.2, y)
    loc = energy.local_contrast(x, sa, 0.2, sb, -0.2, y)
    for a, b in zip(glob, loc):
        torch.testing.assert_close(a, b)
    # layer 0 (params 0, 1) depends on its own post-synaptic state s_1 only (s_0 = x is clamped):
    # changing s_2, s_3 leaves its update unchanged, changing s_1 does not
    sa2 = [sa[0], sa[1] + 1.0, sa[2] + 1.0]
    moved = energy.local_contrast(x, sa2, 0.2, sb, -0.2, y)
    for i in (0, 1):
        torch.testing.assert_close(moved[i], loc[i])
    assert not torch.allclose(moved[2], loc[2])  # layer 1's post-synaptic state moved
    # the last layer sees only (s_2, s_3): moving s_1 leaves it alone
    sa3 = [sa[0] + 1.0, sa[1], sa[2]]
    moved = energy.local_contrast(x, sa3, 0.2, sb, -0.2, y)
    for i in (4, 5):
        torch.testing.assert_close(moved[i], loc[i])


@pytest.mark.parametrize(
    "layers,match",
    [
        ([nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)], "Dropout is not supported in EP mode"),
        ([nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)], "BatchNorm1d is not supported"),
        ([nn.Linear(4, 4), nn.Sequential(nn.ReLU()), nn.Linear(4, 2)], "nested nn.Sequential"),
        ([nn.Linear(4, 4), nn.LSTM(4, 4)], r"LSTM\) is not supported in EP mode.*Supported layers: Linear, Conv2d"),
        ([nn.ReLU(), nn.Flatten()], "no Linear or Conv2d layer"),
    ],
)
def test_unsupported_layers_raise_and_list_the_supported_ones(layers, match):
    with pytest.raises(ConfigError, match=match):
        FeedforwardEnergy(nn.Sequential(*layers))


def test_bad_inputs():
    with pytest.raises(ConfigError, match="needs an nn.Sequential"):
        FeedforwardEnergy(nn.Linear(3, 2))
    with pytest.raises(ConfigError, match="unknown loss_type"):
        FeedforwardEnergy(mlp(), "hinge")
    energy = FeedforwardEnergy(mlp())
    x, y = batch(energy.model)
    x[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        ep_gradients(energy, x, y, EPConfig())
    with pytest.raises(ConfigError, match=r"labels must lie in \[0, 3\)"):
        energy.one_hot(torch.tensor([0, 5]), 3, F64)

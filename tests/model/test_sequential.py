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


# ----------------------------------------------------------------------------- the local flow
def deep(scale=1.0, seed=3):
    """5 blocks (Linear/Tanh, Linear/Softplus, Conv-free): enough depth to tell neighbours from
    far blocks."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 8), nn.Softplus(), nn.Linear(8, 7), nn.Tanh(),
        nn.Linear(7, 6), nn.Sigmoid(), nn.Linear(6, 4),
    ).double()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m


def nudged_local(model, x, y, beta=0.3, loss_type="mse", **kw):
    energy = FeedforwardEnergy(model, loss_type, settle="local", **kw)
    dyn = energy.dynamics(x)
    s0 = energy.forward_init(dyn)
    return energy, dyn.nudge(beta, y), s0


@pytest.mark.parametrize("time_constants", [False, True])
def test_local_field_is_the_gradient_flow_of_F(time_constants):
    model = deep()
    x, y = batch(model)
    energy, dyn, s0 = nudged_local(model, x, y, time_constants=time_constants)
    g = torch.Generator().manual_seed(5)
    s = [t + 0.1 * torch.randn(t.shape, generator=g, dtype=F64) for t in s0]
    leaf = [t.clone().requires_grad_(True) for t in s]
    grad = torch.cat(torch.autograd.grad(energy.total_energy(x, leaf, 0.3, y).sum(), leaf), 1)
    tau = torch.ones_like(grad) if not time_constants else torch.cat(
        [dyn.rates[:, l : l + 1].reciprocal().expand(-1, n) for l, n in enumerate(dyn.sizes)], 1)
    # τ_l ds_l/dt = −∂F/∂s_l, to rounding
    torch.testing.assert_close(dyn.field(torch.cat(s, 1)) * tau, -grad, rtol=0, atol=1e-13)
    assert (dyn.rates is None) == (not time_constants)


def test_a_layers_local_field_depends_only_on_its_neighbours():
    """Layer l's rate is a function of s_{l−1}, s_l, s_{l+1} and blocks l, l+1 only; the Newton
    field of layer 1 moves when the output moves (it sweeps the error back through all blocks)."""
    model = deep()
    x, y = batch(model)
    energy, dyn, s0 = nudged_local(model, x, y)
    sizes = dyn.sizes
    L = len(sizes)
    g = torch.Generator().manual_seed(6)
    s = [t + 0.05 * torch.randn(t.shape, generator=g, dtype=F64) for t in s0]

    def field_of(states, layer, d=dyn):
        return d.field(torch.cat(states, 1)).split(sizes, 1)[layer]

    for l in range(L):
        base = field_of(s, l)
        for k in range(L):
            moved = [t.clone() for t in s]
            moved[k] = moved[k] + 0.5
            changed = not torch.equal(field_of(moved, l), base)
            assert changed == (abs(k - l) <= 1), (l, k)
    # a far block's weights: block 4 (the last) cannot reach layer 1's field; block 2 can
    linears = [m for m in model if isinstance(m, nn.Linear)]
    base = field_of(s, 1)
    for b, near in ((4, False), (3, False), (2, True), (1, True)):
        saved = linears[b].weight.detach().clone()
        with torch.no_grad():
            linears[b].weight.add_(0.3)
        changed = not torch.equal(field_of(s, 1), base)
        with torch.no_grad():
            linears[b].weight.copy_(saved)
        assert changed == near, b
    # the time constants too: τ_1 (0-based layer 1) depends on the gains of blocks 1 and 2 only
    rates = energy.local_rates(s0, dyn.shapes, 0.3, x.shape[0])
    with torch.no_grad():
        linears[4].weight.mul_(3.0)
    energy._gains = None
    far = energy.local_rates(s0, dyn.shapes, 0.3, x.shape[0])
    torch.testing.assert_close(far[:, :3], rates[:, :3], rtol=0, atol=0)
    assert not torch.equal(far[:, 3], rates[:, 3])
    # the Newton field is not local: moving the output changes layer 1's rate
    newton = FeedforwardEnergy(model, "mse").dynamics(x).nudge(0.3, y)
    moved = [t.clone() for t in s]
    moved[-1] = moved[-1] + 0.5
    assert not torch.equal(field_of(moved, 0, newton), field_of(s, 0, newton))


def test_a_nudge_travels_one_block_per_local_step():
    """From the free state, k Euler steps of the local flow move only the top k layers (no
    signal crosses more than one block per evaluation; the others move by float rounding of the
    free state's zero errors, < 1e-15); one Newton step moves them all, by −β times backprop's
    deltas."""
    model = deep()
    x, y = batch(model)
    _, dyn, s0 = nudged_local(model, x, y)
    L = len(s0)
    s = torch.cat(s0, 1)

    def moved(state):
        return [float((a - b).abs().max()) for a, b in zip(state.split(dyn.sizes, 1), s0)]

    for k in range(1, L + 1):
        s = s + dyn.field(s)
        d = moved(s)
        assert [v > 1e-9 for v in d] == [l >= L - k for l in range(L)], (k, d)
        assert all(v < 1e-15 for v, l in zip(d, range(L)) if l < L - k), (k, d)
    newton = FeedforwardEnergy(model, "mse").dynamics(x).nudge(0.3, y)
    assert all(v > 1e-6 for v in moved(torch.cat(s0, 1) + newton.field(torch.cat(s0, 1))))


@pytest.mark.parametrize("loss_type", ["mse", "cross_entropy"])
def test_local_fixed_point_is_the_minimiser_of_F(loss_type):
    """Settled in float64, the local flow ends where scipy's L-BFGS minimisation of F (its own
    float64 fixed point, gradients by autograd) ends, and where the Newton flow ends."""
    import numpy as np
    import scipy.optimize

    model = deep()
    x, y = batch(model, B=3)
    for beta in (0.3, -0.3):
        energy, dyn, s0 = nudged_local(model, x, y, beta=beta, loss_type=loss_type)
        from mep_hw.settle import settle

        loc = torch.cat(settle(dyn, s0, SettleConfig(dt=1.0, atol=1e-13, rtol=0, max_steps=20000)).states, 1)
        newton = FeedforwardEnergy(model, loss_type).dynamics(x).nudge(beta, y)
        ref_newton = torch.cat(settle(newton, s0, TIGHT).states, 1)
        sizes = dyn.sizes

        def fun(v):
            t = torch.tensor(v, dtype=F64).reshape(x.shape[0], -1).requires_grad_(True)
            f = energy.total_energy(x, list(t.split(sizes, 1)), beta, y).sum()
            (g,) = torch.autograd.grad(f, t)
            return float(f.detach()), g.flatten().numpy()

        opt = scipy.optimize.minimize(fun, torch.cat(s0, 1).flatten().numpy(), jac=True, method="L-BFGS-B",
                                      options=dict(gtol=1e-13, ftol=0, maxiter=20000, maxcor=50))
        ref = torch.tensor(opt.x, dtype=F64).reshape(x.shape[0], -1)
        # scipy stops at |∇F| ~ 1e-9 (its line search); the local settle goes on to 1e-13
        assert float((loc - ref).abs().max()) < 1e-7, (beta, float((loc - ref).abs().max()))
        assert np.abs(fun(loc.flatten().numpy())[1]).max() < 1e-11
        assert float((loc - ref_newton).abs().max()) < 1e-10
        # a minimum: F's Hessian at the fixed point is positive definite for every sample
        for b in range(x.shape[0]):
            H = torch.func.hessian(lambda v: energy.total_energy(x[b : b + 1], list(v.unsqueeze(0).split(sizes, 1)), beta, y[b : b + 1]).sum())(loc[b])
            assert float(torch.linalg.eigvalsh(H.detach()).min()) > 0


def test_time_constants_make_a_unit_euler_step_stable_whatever_the_weights_scale():
    """τ_l bounds the l-th block row of F's Hessian, so diag(τ)⁻¹H has its eigenvalues in (0, 1]
    (block Gershgorin) with exact gains, and stays below 2 with the 6-iteration estimates; the
    plain flow at dt = 1 diverges on the same net (weights × 2.5)."""
    from mep_hw.settle import settle

    model = deep(scale=2.5)
    x, y = batch(model, B=4)
    for iters, bound in ((200, 1.0 + 1e-9), (6, 1.5)):
        energy, dyn, s0 = nudged_local(model, x, y, beta=0.1, loss_type="cross_entropy")
        sig = energy.block_gains(s0, dyn.shapes, iters=iters)
        energy._gains = (s0[0], sig)
        rates = energy.local_rates(s0, dyn.shapes, 0.1, x.shape[0])
        for b in range(x.shape[0]):
            H = torch.func.hessian(lambda v: energy.total_energy(
                x[b : b + 1], list(v.unsqueeze(0).split(dyn.sizes, 1)), 0.1, y[b : b + 1]).sum())(torch.cat(s0, 1)[b])
            r = torch.cat([rates[b, l].expand(n) for l, n in enumerate(dyn.sizes)]).sqrt()
            lam = torch.linalg.eigvalsh((r[:, None] * H * r[None, :]).detach())
            assert 0 < float(lam.min()) and float(lam.max()) <= bound, (iters, float(lam.max()))
    cfg = SettleConfig(dt=1.0, atol=1e-10, rtol=0, max_steps=1000)
    assert settle(dyn, s0, cfg).converged
    _, plain, s0 = nudged_local(model, x, y, beta=0.1, loss_type="cross_entropy", time_constants=False)
    assert not settle(plain, s0, cfg, throw=False).converged


def test_block_gains_approach_the_jacobian_norm_from_below():
    model = cnn()
    x, _ = batch(model)
    energy = FeedforwardEnergy(model, settle="local")
    _, free = energy.forward_states(x)
    shapes = energy._shapes[tuple(x.shape[1:])]
    exact = torch.stack([
        torch.linalg.matrix_norm(torch.autograd.functional.jacobian(
            lambda z: energy.blocks[1](z.unsqueeze(0)).flatten(), free[0][b].reshape(shapes[0])).reshape(-1, free[0].shape[1]), 2)
        for b in range(x.shape[0])
    ])
    g6 = energy.block_gains(free, shapes)[:, 1]
    g200 = energy.block_gains(free, shapes, iters=200)[:, 1]
    assert torch.all(g6 <= exact * (1 + 1e-12)) and torch.all(g6 >= 0.8 * exact)
    torch.testing.assert_close(g200, exact, rtol=1e-6, atol=0)
    assert torch.all(energy.block_gains(free, shapes)[:, 0] == 0)  # the clamped first block couples no states


def test_bad_settle_options():
    with pytest.raises(ConfigError, match="unknown settle 'fast'; valid: newton, local"):
        FeedforwardEnergy(mlp(), settle="fast")
    with pytest.raises(ConfigError, match="time_constants"):
        FeedforwardEnergy(mlp(), settle="local", time_constants="yes")

"""The run's host optimizers on the SMEP pipeline: Adam and SGD agree with torch.optim, every
change goes through the writer, error feedback and the coupled constraint act on what a lossy
store achieved."""

import pytest
import torch
from torch import nn

from mep_hw.errors import ConfigError
from mep_hw.host import coupled_spectral_norm
from mep_hw.optimizers import host_optimizer

F64 = torch.float64


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(5, 7, generator=g, dtype=F64)), nn.Parameter(torch.randn(5, generator=g, dtype=F64))]


def grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(5, 7, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)]


@pytest.mark.parametrize("name,ref,kw", [
    ("adam", lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1), dict(lr=0.01, weight_decay=0.1)),
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1), dict(lr=0.05, momentum=0.9, weight_decay=0.1)),
])
@pytest.mark.slow
def test_adam_and_sgd_follow_torch_optim(name, ref, kw):
    a, b = params(), params()
    ours, theirs = host_optimizer(name, a, **kw), ref(b)
    for step in range(6):
        for p, q, g in zip(a, b, grads(step)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)


def test_every_change_goes_through_the_writer_and_error_feedback_keeps_the_rest():
    writes = []

    def coarse(p, delta):  # a store that writes whole multiples of 0.1
        applied = torch.round(delta / 0.1) * 0.1
        p.add_(applied)
        writes.append(p)
        return applied

    ps = params()
    opt = host_optimizer("sgd", ps, lr=0.02, momentum=0.0, weight_decay=0.5, writer=coarse, error_feedback=True)
    before = [p.detach().clone() for p in ps]
    total = [torch.zeros_like(p) for p in ps]
    for step in range(20):
        gs = grads(step)
        for p, g, t in zip(ps, gs, total):
            p.grad = g
        opt.step()
    assert len(writes) == 40  # every parameter, every step, decay included
    for p, b in zip(ps, before):
        moved = p.detach() - b
        assert torch.allclose(moved / 0.1, torch.round(moved / 0.1))  # only ever whole steps
    # what was intended and not written waits in the residual: bounded by half a step
    for p in ps:
        assert opt.state[p]["ef_residual"].abs().max() <= 0.05 + 1e-12


def test_the_coupled_constraint_bounds_the_chain_through_the_writer():
    g = torch.Generator().manual_seed(0)
    chain = [nn.Parameter(torch.randn(6, 8, generator=g, dtype=F64)), nn.Parameter(torch.randn(4, 6, generator=g, dtype=F64))]
    calls = []

    def writer(p, delta):
        calls.append(p)
        p.add_(delta)
        return delta

    opt = host_optimizer("adam", chain, lr=1e-3, writer=writer, coupled=chain, coupled_gamma=0.5)
    for p in chain:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert coupled_spectral_norm([p.detach() for p in chain]).sigma == pytest.approx(0.5, rel=1e-6)
    assert opt.last_coupled_sigma > 0.5 and len(calls) == 4  # two updates, two rescales, all written
    state = opt.state_dict()
    opt2 = host_optimizer("adam", chain, lr=1e-3, writer=writer, coupled=chain, coupled_gamma=0.5)
    opt2.load_state_dict(state)
    assert torch.equal(opt2.coupled_state["coupled_v"][0], opt.coupled_state["coupled_v"][0])


def test_unknown_host_optimizer_and_missing_gamma_are_errors():
    with pytest.raises(ConfigError, match="unknown host optimizer 'rmsprop'; valid: adam, sgd, muon, dion"):
        host_optimizer("rmsprop", params(), lr=0.1)
    with pytest.raises(ConfigError, match="coupled= needs coupled_gamma"):
        host_optimizer("adam", params(), lr=0.1, coupled=params())


def test_adam_groups_with_their_own_rates_follow_torch_optim_bit_for_bit():
    """Groups with their own learning rates (the per-layer width rule) go to torch's fused kernel
    jointly, one call per rate: every parameter ends bit-identical to torch.optim.Adam's fused
    step with the same groups (float32, as a training run)."""
    g = torch.Generator().manual_seed(3)
    shapes = [(6, 9), (6,), (4, 6), (4,)]
    a = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    b = [nn.Parameter(p.detach().clone()) for p in a]

    def groups(ps):
        return [{"params": [ps[0]], "lr": 0.004}, {"params": [ps[2]], "lr": 0.01}, {"params": [ps[1], ps[3]], "lr": 0.01}]

    def step_both(opt, ps, seed):
        gg = torch.Generator().manual_seed(seed)
        for p, q in zip(ps, b):
            p.grad = torch.randn(p.shape, generator=gg)
            q.grad = p.grad.clone()
        opt.step()
        theirs.step()
        for p, q in zip(ps, b):
            assert torch.equal(p.detach(), q.detach())

    ours = host_optimizer("adam", groups(a), lr=0.01)
    theirs = torch.optim.Adam(groups(b), lr=0.01, fused=True)
    for step in range(5):
        step_both(ours, a, 50 + step)
    # a resumed optimizer (torch's load_state_dict keeps "step" on the CPU) steps on identically
    c = [nn.Parameter(p.detach().clone()) for p in a]
    again = host_optimizer("adam", groups(c), lr=0.01)
    again.load_state_dict(ours.state_dict())
    step_both(again, c, 99)

"""EP on convolutional Hopfield networks, and the holomorphic estimator, against the gradient
from implicit differentiation through the fixed point (float64 / complex128)."""

import numpy as np
import pytest
import torch

from mep_hw.hw import TileStore
from tests.model.test_conv import card_of

from mep_hw.ep import EPConfig, ep_gradients
from mep_hw.errors import ConfigError
from mep_hw.hw import IdealDevice, Periphery, Tile
from mep_hw.model import ConvHopfield, FeedforwardEnergy, one_hot
from mep_hw.settle import SettleConfig
from tests.ep.test_estimators import TIGHT, implicit_gradient, rel_err, small_net

F64 = torch.float64


def small_conv(pool="pool", activation="sigmoid", cost="mse", seed=0):
    """1×6×6 input → conv 2@3×3 → 2×4×4 → 2×2 pooling → 8 → fc 5 → fc 3 (output or readout)."""
    m = ConvHopfield(f"conv:2:3,{pool}:2,fc:5,fc:3", (1, 6, 6), activation=activation, cost=cost,
                     generator=torch.Generator().manual_seed(seed), dtype=F64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for w in m.weights:
            w.mul_(0.6)
        for b in m.biases:
            b.uniform_(0.2, 0.6, generator=g)
    x = torch.rand(3, 36, generator=g, dtype=F64)
    y = one_hot(torch.randint(0, 3, (3,), generator=g), 3, F64)
    return m, x, y


def slope(betas, errs):
    return np.polyfit(np.log(betas), np.log(errs), 1)[0]


@pytest.mark.parametrize("pool", ["pool", "avgpool"])
@pytest.mark.parametrize("cost", ["mse", "ce"])
def test_conv_ep_converges_to_the_implicit_gradient_with_the_right_order(pool, cost):
    m, x, y = small_conv(pool, cost=cost)
    ref = implicit_gradient(m, x, y)
    betas = np.array([0.1, 0.05, 0.025])
    for estimator, order, tol in (("one-sided", 1.0, 0.2), ("symmetric", 2.0, 0.15)):
        errs = []
        for beta in betas:
            cfg = EPConfig(beta=float(beta), estimator=estimator, init="zeros", free=TIGHT, nudged=TIGHT, strict=True)
            errs.append(rel_err(ep_gradients(m, x, y, cfg).grads, ref))
        assert abs(slope(betas, errs) - order) < tol, (estimator, errs)
        if estimator == "symmetric":
            assert errs[-1] < 1e-2


def test_conv_hard_sigmoid_symmetric_estimate_matches_the_implicit_gradient():
    m, x, y = small_conv(activation="hard_sigmoid")
    ref = implicit_gradient(m, x, y)
    cfg = EPConfig(beta=1e-3, estimator="symmetric", init="zeros", free=TIGHT, nudged=TIGHT, strict=True)
    assert rel_err(ep_gradients(m, x, y, cfg).grads, ref) < 1e-5


def test_conv_ep_through_tiles_equals_exact_weights():
    # ideal tiles read by unfold → mvm → fold: the same EP gradient as conv2d on exact weights
    m, x, y = small_conv(cost="ce")
    cfg = EPConfig(beta=0.1, init="forward", free=TIGHT, nudged=TIGHT)
    a = ep_gradients(m, x, y, cfg).grads
    m.use_store(TileStore(card_of(IdealDevice(), Periphery()), list(m.weights), seed=0))
    b = ep_gradients(m, x, y, cfg).grads
    assert rel_err(b, a) < 1e-10
    assert m.store.counts(0).macs > 0


# ----------------------------------------------------------------------------- holomorphic EP
@pytest.mark.parametrize("cost", ["mse", "ce"])
@pytest.mark.parametrize("N", [3, 4, 5])
def test_holomorphic_bias_falls_as_beta_to_the_n(cost, N):
    # the N-point estimate at |β| is a_1 + a_{N+1}|β|^N + …: log-log slope N
    m, x, y = small_net(cost=cost)
    ref = implicit_gradient(m, x, y)
    betas = np.array([0.2, 0.14, 0.1, 0.07])
    errs = []
    for beta in betas:
        cfg = EPConfig(beta=float(beta), estimator="holomorphic", points=N, init="zeros", free=TIGHT, nudged=TIGHT, strict=True)
        errs.append(rel_err(ep_gradients(m, x, y, cfg).grads, ref))
    assert abs(slope(betas, errs) - N) < 0.3, errs
    # at the same |β| more points are more exact
    sym = rel_err(ep_gradients(m, x, y, EPConfig(beta=0.07, init="zeros", free=TIGHT, nudged=TIGHT)).grads, ref)
    assert errs[-1] < 0.25 * sym


def test_holomorphic_on_a_conv_net_with_average_pooling():
    m, x, y = small_conv("avgpool", cost="ce")
    ref = implicit_gradient(m, x, y)
    betas = np.array([0.3, 0.2, 0.14, 0.1])
    errs = [rel_err(ep_gradients(m, x, y, EPConfig(beta=float(b), estimator="holomorphic", points=4, init="zeros",
                                                   free=TIGHT, nudged=TIGHT, strict=True)).grads, ref) for b in betas]
    assert abs(slope(betas, errs) - 4) < 0.3, errs


def test_two_points_are_the_symmetric_estimator():
    m, x, y = small_net(cost="ce")
    sym = ep_gradients(m, x, y, EPConfig(beta=0.2, init="zeros", free=TIGHT, nudged=TIGHT)).grads
    holo = ep_gradients(m, x, y, EPConfig(beta=0.2, estimator="holomorphic", points=2, init="zeros", free=TIGHT, nudged=TIGHT))
    assert rel_err(holo.grads, sym) < 1e-12
    assert len(holo.nudged) == 2 and all(not r.states[0].is_complex() for r in holo.nudged)


def test_only_the_phases_with_nonnegative_imaginary_beta_settle():
    m, x, y = small_net()
    r = ep_gradients(m, x, y, EPConfig(beta=0.1, estimator="holomorphic", points=5, init="zeros", free=TIGHT, nudged=TIGHT))
    kinds = [res.states[0].is_complex() for res in r.nudged]
    assert kinds == [False, True, True]  # β = |β|, |β|e^{2πi/5}, |β|e^{4πi/5}; their conjugates are implied
    assert all(not g.is_complex() for g in r.grads)
    assert all(not res.time.is_complex() for res in r.nudged)


def test_holomorphic_through_tiles_reads_complex_states_as_two_real_reads():
    m, x, y = small_net(cost="ce")
    cfg = EPConfig(beta=0.2, estimator="holomorphic", points=3, init="zeros", free=TIGHT, nudged=TIGHT)
    exact = ep_gradients(m, x, y, cfg).grads
    m.use_store(TileStore(card_of(IdealDevice(), Periphery(dac_bits=0)), list(m.weights), seed=0))
    dev = ep_gradients(m, x, y, cfg).grads
    assert rel_err(dev, exact) < 1e-10
    assert m.store.counts(0).macs > 0


def test_holomorphic_needs_a_holomorphic_field():
    m, x, y = small_net(activation="hard_sigmoid")
    with pytest.raises(ConfigError, match="needs a holomorphic activation.*'hard_sigmoid' is not one.*'sigmoid'"):
        ep_gradients(m, x, y, EPConfig(estimator="holomorphic", init="zeros"))
    ff = FeedforwardEnergy(torch.nn.Sequential(torch.nn.Linear(6, 4)))
    with pytest.raises(ConfigError, match="needs a Hopfield energy"):
        ep_gradients(ff, x, torch.tensor([0, 1, 2, 3, 0]), EPConfig(estimator="holomorphic"))
    with pytest.raises(ConfigError, match="nudged-phase solver 'dopri5' does not support"):
        EPConfig(estimator="holomorphic", nudged=SettleConfig(solver="dopri5"))
    with pytest.raises(ConfigError, match="points=1 must be an integer ≥ 2"):
        EPConfig(estimator="holomorphic", points=1)

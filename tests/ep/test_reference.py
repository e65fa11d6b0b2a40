"""The exact-gradient reference (implicit function theorem by conjugate gradients) against the
dense-Hessian implicit gradient and against finite differences of the settled loss."""

import pytest
import torch

from mep_hw.ep.reference import exact_fixed_point, grad_alignment, implicit_gradient
from mep_hw.model import LayeredHopfield, one_hot
from tests.ep.test_estimators import TIGHT, implicit_gradient as dense_implicit_gradient, rel_err, small_net

F64 = torch.float64


@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("cost", ["mse", "ce"])
def test_cg_implicit_gradient_equals_the_dense_hessian_solution(activation, cost):
    m, x, y = small_net(activation=activation, cost=cost)
    fp = exact_fixed_point(m, x, m.zero_init(x), atol=1e-13)
    ig = implicit_gradient(m, x, y, fp.states)
    assert ig.cg_residual < 1e-9 and ig.min_curvature > 0
    assert rel_err(ig.grads, dense_implicit_gradient(m, x, y)) < 1e-9


def test_implicit_gradient_equals_finite_differences_of_the_settled_loss():
    """L(θ) = mean C(s*(θ)) differentiated by central differences through a settle to 1e-13,
    for a few weights of each matrix (hard sigmoid: the active set is fixed for a small step)."""
    m, x, y = small_net(activation="hard_sigmoid")
    fp = exact_fixed_point(m, x, m.zero_init(x), atol=1e-13)
    ig = implicit_gradient(m, x, y, fp.states)

    def loss():
        s = exact_fixed_point(m, x, fp.states, atol=1e-14).states
        return float(m.cost_fn(s, y).mean())

    h = 1e-6
    g = torch.Generator().manual_seed(3)
    for k, w in enumerate(m.weights):
        for _ in range(3):
            i = int(torch.randint(0, w.shape[0], (1,), generator=g))
            j = int(torch.randint(0, w.shape[1], (1,), generator=g))
            with torch.no_grad():
                w[i, j] += h
                lp = loss()
                w[i, j] -= 2 * h
                lm = loss()
                w[i, j] += h
            fd = (lp - lm) / (2 * h)
            assert abs(fd - float(ig.grads[2 * k][i, j])) < 1e-7 + 1e-5 * abs(fd), (k, i, j, fd, float(ig.grads[2 * k][i, j]))


def test_grad_alignment_cosine_and_relative_error():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    b = [torch.tensor([1.0, 1.0]), torch.tensor([0.0])]
    al = grad_alignment(a, b)
    assert al["cos"] == pytest.approx(2 ** -0.5)
    assert al["rel_err"] == pytest.approx(2 ** -0.5)
    assert al["cos_each"][0] == pytest.approx(2 ** -0.5)

"""The exact gradient an EP estimate approximates, by the implicit function theorem.

For the loss L(θ) = mean_b C(s*_b(θ)) at the free fixed point s* (∂E/∂s(s*, θ) = 0), the
implicit function theorem gives (Almeida 1987, Pineda 1987; the reference of Scellier & Bengio
2017's EP theorem)::

    dL/dθ = ∂C/∂θ − λᵀ ∂²E/∂s∂θ,        H λ = ∂C/∂s,   H = ∂²E/∂s²  (per sample)

For a box activation (the hard sigmoid) a unit pinned at a face of the box does not move with θ:
it is left out of H and λ (λ = 0 there), as the projected dynamics do. H is block diagonal over
the samples; λ is found by conjugate gradients on Hessian–vector products taken with autograd
through :meth:`LayeredHopfield.energy` (double backward), so nothing here uses the analytic field
the settle integrates: it is an independent check of it. At a stable fixed point H is positive
definite on the free units. ``ImplicitGradient.min_curvature`` is the smallest Rayleigh quotient
pᵀHp / pᵀp over the CG search directions: a value ≤ 0 proves the point is not a minimum (a
saddle: the solve is then meaningless and the gradient undefined); a positive value is only an
upper bound on H's smallest eigenvalue.

The fixed point itself is :func:`exact_fixed_point`: the model's settle, run in the model's
dtype (use float64) to a tight absolute tolerance from the same initial state as the estimate.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from mep_hw.settle import SettleConfig, SettleResult, settle

__all__ = ["ImplicitGradient", "exact_fixed_point", "implicit_gradient", "grad_alignment"]


class ImplicitGradient(NamedTuple):
    grads: list[Tensor]  # dL/dθ in the order of model.param_list()
    lam: tuple[Tensor, ...]  # λ per layer, (batch, n_l); zero on pinned units
    cg_iters: int
    cg_residual: float  # max over samples of ‖Hλ − ∂C/∂s‖ / ‖∂C/∂s‖
    min_curvature: float  # min over CG directions of pᵀHp / pᵀp (≤ 0: not a minimum; else ≥ λ_min(H))
    free_frac: float  # share of state units strictly inside the box


def exact_fixed_point(model, x: Tensor, init: Sequence[Tensor] | None = None, *, atol: float = 1e-11,
                      dt: float = 0.5, max_steps: int = 200_000) -> SettleResult:
    """The free fixed point to rms(ds/dt) ≤ ``atol`` (Euler at ``dt`` from ``init``, default the
    bottom-up pass); raises SettleError if it is not reached."""
    dyn = model.dynamics(x)
    if init is None:
        init = model.forward_init(dyn)
    return settle(dyn, init, SettleConfig(solver="euler", dt=dt, atol=atol, rtol=0.0, max_steps=max_steps))


def _free_mask(model, states: Sequence[Tensor], tol: float = 1e-9) -> Tensor:
    flat = torch.cat(list(states), 1)
    if model.act.box is None:
        return torch.ones_like(flat, dtype=torch.bool)
    lo, hi = model.act.box
    return (flat > lo + tol) & (flat < hi - tol)


def implicit_gradient(model, x: Tensor, target: Tensor, states: Sequence[Tensor], *, cg_tol: float = 1e-10,
                      max_iter: int = 5000) -> ImplicitGradient:
    """dL/dθ at the free fixed point ``states`` of ``model`` for the batch (x, target), L the
    batch mean of the model's cost (see the module docstring). Use a float64 model and states
    from :func:`exact_fixed_point`."""
    sizes = [t.shape[1] for t in states]
    B = x.shape[0]
    free = _free_mask(model, states).to(x.dtype)
    params = model.param_list()

    def split(v: Tensor) -> list[Tensor]:
        return list(v.split(sizes, 1))

    s = torch.cat([t.detach() for t in states], 1).requires_grad_(True)
    with torch.enable_grad():
        dC = torch.autograd.grad(model.cost_fn(split(s), target).mean(), s)[0] * free
        gE = torch.autograd.grad(model.energy(x, split(s)).sum(), s, create_graph=True)[0]

        def hvp(v: Tensor) -> Tensor:
            return torch.autograd.grad(gE, s, grad_outputs=v * free, retain_graph=True)[0] * free

        # batched conjugate gradients: one independent system per sample
        lam = torch.zeros_like(dC)
        r = dC.clone()
        p = r.clone()
        rr = (r * r).sum(1)
        b_norm = rr.sqrt().clamp_min(1e-300)
        min_curv = float("inf")
        it = 0
        for it in range(1, max_iter + 1):
            Hp = hvp(p)
            pHp = (p * Hp).sum(1)
            pp = (p * p).sum(1)
            live = pp > 0
            if live.any():
                min_curv = min(min_curv, float((pHp[live] / pp[live]).min()))
            alpha = torch.where(live & (pHp > 0), rr / pHp.where(pHp > 0, torch.ones_like(pHp)), torch.zeros_like(rr))
            lam = lam + alpha[:, None] * p
            r = r - alpha[:, None] * Hp
            rr_new = (r * r).sum(1)
            if float((rr_new.sqrt() / b_norm).max()) <= cg_tol:
                rr = rr_new
                break
            p = r + (rr_new / rr.clamp_min(1e-300))[:, None] * p
            rr = rr_new
        res = float((hvp(lam) - dC).norm(dim=1).div(b_norm).max())
        obj = model.cost_fn(split(s.detach()), target).mean() - (gE * lam.detach()).sum()
        g = torch.autograd.grad(obj, params, allow_unused=True)
    grads = [gi.detach() if gi is not None else torch.zeros_like(p_) for gi, p_ in zip(g, params)]
    return ImplicitGradient(grads, tuple(lam.detach().split(sizes, 1)), it, res, min_curv, float(free.mean()))


def grad_alignment(est: Sequence[Tensor], ref: Sequence[Tensor]) -> dict:
    """Cosine and relative error ‖est − ref‖/‖ref‖ of an estimate against the reference: over all
    parameters (``cos``, ``rel_err``) and per tensor (``cos_each``, ``rel_err_each``)."""
    def one(a, b):
        a, b = a.double().flatten(), b.double().flatten()
        nb = float(b.norm())
        na = float(a.norm())
        cos = float(a @ b) / max(na * nb, 1e-300)
        return cos, float((a - b).norm()) / max(nb, 1e-300)

    each = [one(a, b) for a, b in zip(est, ref, strict=True)]
    tot = one(torch.cat([a.double().flatten() for a in est]), torch.cat([b.double().flatten() for b in ref]))
    return {"cos": tot[0], "rel_err": tot[1], "cos_each": [c for c, _ in each], "rel_err_each": [e for _, e in each]}

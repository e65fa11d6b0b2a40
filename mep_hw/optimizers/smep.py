"""``SMEPOptimizer`` and ``SDMEPOptimizer``: real ``torch.optim.Optimizer`` classes that compose
the strategies of :mod:`mep_hw.optimizers.strategies`.

Two modes:

* ``mode='backprop'``: the user calls ``loss.backward()``; ``step()`` applies Muon to 2-D
  weights and flattened conv filters and Adam to biases, gains and everything else.
* ``mode='ep'``: no ``.backward()``. Either pass the model once (``model=``) and let its forward
  pass in training mode be the free phase, then ``step(target=y)``; or call
  ``step(x=x, target=y, model=model)`` (the legacy form). The EP estimate goes into ``.grad``
  and the same update rules apply.

Per parameter, one step is: gradient (+ L2 decay) → (natural-gradient whitening) → update rule
(Muon, Dion, momentum or Adam for matrices; Adam or momentum otherwise) → −lr × direction
(− decoupled decay) (+ error-feedback residual) → written through ``writer`` (exact by default)
→ spectral constraint on matrices. After all parameters, an optional coupled constraint bounds a
chain of matrices together (the coupling operator of a layered Hopfield network), its rescale
written through the same ``writer``. The writer is the only way a step changes a parameter, so
a weight store (:mod:`mep_hw.hw.store`) can hold the matrices on a device: error feedback and
both constraints then act on what the device achieved and holds.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from mep_hw.ep import EPResult
from mep_hw.errors import ConfigError
from mep_hw.model import FeedforwardEnergy
from mep_hw.optimizers.strategies import (
    AdamUpdate,
    DionUpdate,
    EPGradient,
    ErrorFeedback,
    LocalEPGradient,
    MomentumUpdate,
    MuonUpdate,
    NaturalGradient,
    SpectralConstraint,
    settle_safe_gamma,
)

__all__ = ["SMEPOptimizer", "SDMEPOptimizer", "MODES"]

MODES = ("ep", "backprop")
GRADIENTS = ("ep", "local")
MATRIX_UPDATES = ("muon", "momentum", "adam")
OTHER_UPDATES = ("adam", "momentum")
WEIGHT_DECAY_MODES = ("decoupled", "l2")


def _exact_writer(p: Tensor, delta: Tensor) -> Tensor:
    p.add_(delta)
    return delta


class SMEPOptimizer(torch.optim.Optimizer):
    """Spectral Muon EP: EP (or backprop) gradients, Muon updates, optional spectral constraint,
    error feedback and natural-gradient whitening.

    Args (besides ``params``): ``model`` the ``nn.Sequential`` to train in EP mode; ``lr`` the
    learning rate of matrix parameters (Muon); ``adam_lr`` that of the others (default
    ``other_lr_scale × lr``, ``other_lr_scale`` = 0.1); ``mode`` 'ep' or 'backprop'; for EP: ``settle`` the flow of the nudged
    phases — 'newton' (default: a backprop-equivalent Newton flow, each step sweeps the output
    error back through every block; a few steps) or 'local' (the gradient flow of the energy,
    each layer driven by its own error and its upper neighbour's; truly local, tens to hundreds
    of steps; see :class:`EPGradient`) — ``beta``, ``estimator``, ``settle_steps`` (step limit;
    default 20 for 'newton', 300 for 'local'), ``settle_lr`` (Euler step of the nudged settle,
    in units of τ), ``settle_tol``, ``loss_type`` ('mse' or 'cross_entropy') and ``gradient``
    ('ep' or 'local': the layer-local contrast);
    ``momentum``, ``nesterov``, ``ns_steps`` for Muon; ``use_spectral_constraint`` with
    ``gamma`` (a number, or 'auto' in EP mode: the largest per-layer bound that guarantees the
    nudged settle converges, :func:`settle_safe_gamma`); ``use_error_feedback``; ``use_natural_gradient`` with ``natural_damping``,
    ``natural_ema``, ``natural_refresh``; ``matrix_update`` ('muon', 'momentum' or 'adam') and
    ``other_update`` ('adam' or 'momentum') for the rest; ``weight_decay`` with
    ``weight_decay_mode`` ('decoupled': −lr·λ·p added to the step; 'l2': λ·p added to the
    gradient); ``writer(param, delta) -> applied`` to apply updates through a lossy store
    (default: exact), with ``weight_bound(param) -> float | None``, the largest |w| that store
    holds (error feedback keeps only the reachable part of its residual); ``coupled`` (a sequence of matrix parameters forming the chain of a
    layered Hopfield network) with ``coupled_gamma``: after every step ‖𝒲‖ ≤ γ for the coupling
    operator of the chain (DESIGN §3), measured on the parameters as written.
    """

    def __init__(
        self,
        params,
        model: nn.Module | None = None,
        lr: float = 0.02,
        mode: str = "ep",
        beta: float = 0.1,
        settle_steps: int | None = None,
        settle_lr: float = 1.0,
        settle_tol: float = 1e-5,
        loss_type: str = "cross_entropy",
        estimator: str = "symmetric",
        gradient: str = "ep",
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adam_lr: float | None = None,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        use_spectral_constraint: bool = False,
        gamma: float | str = 0.95,
        use_error_feedback: bool = False,
        use_natural_gradient: bool = False,
        natural_damping: float = 1e-2,
        natural_ema: float = 0.95,
        natural_refresh: int = 10,
        matrix_update: str = "muon",
        other_update: str = "adam",
        other_lr_scale: float = 0.1,
        weight_decay_mode: str = "decoupled",
        writer: Callable[[Tensor, Tensor], Tensor] | None = None,
        weight_bound: Callable[[Tensor], float | None] | None = None,
        coupled: Sequence[Tensor] | None = None,
        coupled_gamma: float | None = None,
        settle: str = "newton",
        **extra,
    ):
        for name, value, valid in (("mode", mode, MODES), ("gradient", gradient, GRADIENTS), ("matrix_update", matrix_update, MATRIX_UPDATES),
                                   ("other_update", other_update, OTHER_UPDATES), ("weight_decay_mode", weight_decay_mode, WEIGHT_DECAY_MODES)):
            if value not in valid:
                raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("other_lr_scale", other_lr_scale)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name}={v!r} must be a finite number ≥ 0")
        if not 0 <= momentum < 1:
            raise ConfigError(f"momentum={momentum} must be in [0, 1)")
        if gamma == "auto" and mode != "ep":
            raise ConfigError("gamma='auto' bounds the EP settle; in mode='backprop' give gamma as a number")
        defaults = dict(
            lr=lr, adam_lr=adam_lr, adam_betas=tuple(adam_betas), eps=eps, weight_decay=weight_decay,
            momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, matrix_update=matrix_update,
            other_update=other_update, other_lr_scale=other_lr_scale, weight_decay_mode=weight_decay_mode,
            use_spectral_constraint=use_spectral_constraint, gamma=gamma,
            use_error_feedback=use_error_feedback, use_natural_gradient=use_natural_gradient,
            natural_damping=natural_damping, natural_ema=natural_ema, natural_refresh=natural_refresh,
            **extra,
        )
        super().__init__(params, defaults)
        self.mode = mode
        self.model = model
        self.gradient_source = (LocalEPGradient if gradient == "local" else EPGradient)(
            beta=beta, estimator=estimator, settle_steps=settle_steps, settle_lr=settle_lr,
            settle_tol=settle_tol, loss_type=loss_type, settle=settle,
        )
        self.gradient_source.config()  # validate now, not at the first step
        self.writer = writer or _exact_writer
        self.weight_bound = weight_bound
        self.coupled = list(coupled) if coupled else []
        if self.coupled:
            if coupled_gamma is None:
                raise ConfigError("coupled= needs coupled_gamma, the bound on the chain's coupling operator")
            self.coupled_constraint = SpectralConstraint(gamma=coupled_gamma)
            self.coupled_state: dict = {}
        self.last_coupled_sigma: float | None = None
        self.last_result: EPResult | None = None
        self._energies: dict[int, FeedforwardEnergy] = {}
        self._captured: dict[int, tuple[Tensor, list[Tensor]]] = {}
        self._hooks = []
        for g in self.param_groups:  # validate strategy hyperparameters now
            self._strategies(g)
        if model is not None and mode == "ep":
            self._attach(model)

    # ------------------------------------------------------------------ EP plumbing
    def _energy(self, model: nn.Module) -> FeedforwardEnergy:
        key = id(model)
        if key not in self._energies:
            self._energies[key] = self.gradient_source.energy(model)
        return self._energies[key]

    def _attach(self, model: nn.Module) -> None:
        """Record the forward pass of ``model`` in training mode: it is the free phase."""
        energy = self._energy(model)
        key = id(model)
        ends = [b[-1] for b in energy.blocks]
        pending: dict = {}

        def on_input(module, args):
            if module.training:
                pending.clear()
                pending["x"] = args[0].detach()
                pending["states"] = []

        def on_block(module, args, out):
            if module.training and "states" in pending:
                pending["states"].append(out.detach().reshape(out.shape[0], -1))
                if len(pending["states"]) == len(ends):
                    self._captured[key] = (pending["x"], pending["states"])
                    pending.clear()

        self._hooks.append(model.register_forward_pre_hook(on_input))
        self._hooks += [m.register_forward_hook(on_block) for m in ends]

    def _ep_gradients(self, x, target, model) -> Tensor:
        if target is None:
            raise ConfigError(
                "mode='ep' needs the target: call step(target=y) after a forward pass of the model in "
                "training mode, or step(x=x, target=y, model=model)"
            )
        model = model if model is not None else self.model
        if model is None:
            raise ConfigError("mode='ep' needs the model: pass model= to the optimizer or to step()")
        energy = self._energy(model)
        free_states = None
        if x is None:
            cap = self._captured.pop(id(model), None)
            if cap is None:
                raise ConfigError(
                    "no forward pass was recorded: run model(x) in training mode (model.train()) before "
                    "step(target=y), or pass x= to step(); the optimizer records the model given at construction"
                )
            x, free_states = cap
            if free_states[0].shape[0] != target.shape[0]:
                raise ConfigError(
                    f"the recorded forward pass had {free_states[0].shape[0]} samples but target has "
                    f"{target.shape[0]}; run the forward pass on the same batch"
                )
        res = self.gradient_source.compute(energy, x, target, free_states)
        self.last_result = res
        if any(g["use_natural_gradient"] for g in self.param_groups):
            self._observe_inputs(energy, x, res.free.states)
        return res.loss.mean()

    @torch.no_grad()
    def _observe_inputs(self, energy: FeedforwardEnergy, x: Tensor, states) -> None:
        s0 = energy.prelude(x)
        inputs = [s0] + [s.reshape(s.shape[0], *sh) for s, sh in zip(states[:-1], energy._shapes[tuple(x.shape[1:])][:-1])]
        for block, inp in zip(energy.blocks, inputs):
            module = block[0]
            group = self._group_of(module.weight)
            if group is None or not group["use_natural_gradient"]:
                continue
            ng = self._strategies(group)["natural"]
            ng.observe(module.weight, ng.inputs_of(module, inp), self.state[module.weight])

    def _group_of(self, p):
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        return None

    # ------------------------------------------------------------------ updates
    def _strategies(self, group: dict) -> dict:
        adam = AdamUpdate(betas=group["adam_betas"], eps=group["eps"])
        momentum = MomentumUpdate(momentum=group["momentum"])
        kind = group["matrix_update"]
        matrix = (
            MuonUpdate(momentum=group["momentum"], nesterov=group["nesterov"], ns_steps=group["ns_steps"])
            if kind == "muon" else adam if kind == "adam" else momentum
        )
        return {
            "matrix": matrix,
            "other": adam if group["other_update"] == "adam" else momentum,
            "natural": NaturalGradient(damping=group["natural_damping"], ema=group["natural_ema"], refresh=group["natural_refresh"]),
            "spectral": SpectralConstraint(gamma=self._gamma(group)),
            "feedback": ErrorFeedback(),
        }

    def _matrix_rule(self, group: dict, strategies: dict, p: Tensor):
        return strategies["matrix"]

    def _gamma(self, group: dict) -> float:
        if group["gamma"] != "auto":
            return group["gamma"]
        energy = next(iter(self._energies.values()), None)
        if energy is None:  # resolved at the first EP step, once the model is known
            return math.inf
        src = self.gradient_source
        return settle_safe_gamma(src.beta, len(energy.blocks), src.loss_type)

    @torch.no_grad()
    def step(self, closure=None, *, x: Tensor | None = None, target: Tensor | None = None, model: nn.Module | None = None):
        """One optimisation step; returns the loss (EP: the mean cost at the free state)."""
        loss = None
        if self.mode == "ep":
            loss = self._ep_gradients(x, target, model)
        else:
            if x is not None or target is not None:
                raise ConfigError("mode='backprop' takes its gradients from loss.backward(); step() takes no x or target")
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
        joint = self._fused_adam_joint()  # the groups Adam updated in place, all in one kernel per setting
        for group in self.param_groups:
            if id(group) in joint:
                continue
            st = self._strategies(group)
            lr = group["lr"]
            other_lr = group["adam_lr"] if group["adam_lr"] is not None else lr * group["other_lr_scale"]
            wd, decoupled = group["weight_decay"], group["weight_decay_mode"] == "decoupled"
            fused = self._fused_adam(group, lr, other_lr) if self._fused_adam_applies(group) else None
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                is_matrix = p.ndim >= 2
                lr_p = lr if is_matrix else other_lr
                if fused is not None:
                    delta = fused[id(p)]
                else:
                    g = p.grad
                    if wd and not decoupled:
                        g = g.add(p, alpha=wd)
                    if is_matrix:
                        if group["use_natural_gradient"]:
                            g = st["natural"].precondition(p, g, state)
                        rule = self._matrix_rule(group, st, p)
                        d = rule.direction(p, g, state)
                    else:
                        d = st["other"].direction(p, g, state)
                    delta = d.mul_(-lr_p)
                    if wd and decoupled:  # p(1 − lr·λ): σ shrinks by the same factor
                        delta.add_(p, alpha=-lr_p * wd)
                        if "spectral_ub" in state:
                            state["spectral_ub"] *= 1.0 - lr_p * wd
                if group["use_error_feedback"]:
                    intended = st["feedback"].intended(delta, state)
                    applied = self.writer(p, intended)
                    st["feedback"].record(intended, applied, state, p, self.weight_bound(p) if self.weight_bound else None)
                else:
                    applied = self.writer(p, delta)
                if is_matrix and group["use_spectral_constraint"]:
                    # a bound on σ_max of what was written: the rule's own when the write was exact
                    # (σ ≤ Frobenius norm for anything else)
                    exact = applied is delta and self.writer is _exact_writer
                    bound = lr_p * rule.spectral_bound(p) if exact else float(torch.linalg.vector_norm(applied))
                    st["spectral"].apply(p, state, bound)
        if self.coupled:
            self.last_coupled_sigma = self.coupled_constraint.apply_coupled(self.coupled, self.coupled_state, writer=self.writer)
        return loss

    def state_dict(self):
        d = super().state_dict()
        if self.coupled:
            d["coupled_state"] = dict(self.coupled_state)
        return d

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        coupled = state_dict.pop("coupled_state", None)
        super().load_state_dict(state_dict)
        if self.coupled and coupled is not None:
            self.coupled_state = dict(coupled)

    @staticmethod
    def _fused_adam_applies(group: dict) -> bool:
        return (group["matrix_update"] == "adam" and group["other_update"] == "adam"
                and not group["use_natural_gradient"] and not group["use_spectral_constraint"])

    def _adam_state(self, p) -> dict:
        """Adam's state of ``p`` for torch's fused kernel (made at the first step; ``step`` moved
        beside ``p``, where torch's ``load_state_dict`` leaves it on the CPU)."""
        st = self.state[p]
        if "exp_avg" not in st:
            st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        elif st["step"].device != p.device:
            st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
        return st

    @staticmethod
    def _adam_kernel(targets, params, states, lr: float, group: dict) -> None:
        """torch's fused Adam kernel (torch.optim.adam's functional API) on ``targets`` (the
        parameters themselves, or copies), with the gradients of ``params`` and the settings of
        ``group``."""
        from torch.optim.adam import adam as adam_fn

        b1, b2 = group["adam_betas"]
        adam_fn(targets, [p.grad for p in params], [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], [],
                [st["step"] for st in states], fused=targets[0].device.type in ("cpu", "cuda"), amsgrad=False,
                beta1=b1, beta2=b2, lr=lr, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                decoupled_weight_decay=group["weight_decay_mode"] == "decoupled")

    def _fused_adam_joint(self) -> set[int]:
        """Adam, in place, on every group that takes it with the exact writer and no error
        feedback: the tensors of all such groups that share a learning rate and Adam's other
        settings go to torch's fused kernel in one call (one call per group and kind cost
        ≈ 0.3 ms each on a CPU, as much as the kernel itself). Returns the ids of those groups."""
        if self.writer is not _exact_writer:
            return set()
        buckets: dict[tuple, tuple[dict, list]] = {}
        done: set[int] = set()
        for group in self.param_groups:
            if group["use_error_feedback"] or not self._fused_adam_applies(group):
                continue
            done.add(id(group))
            lr = group["lr"]
            other_lr = group["adam_lr"] if group["adam_lr"] is not None else lr * group["other_lr_scale"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                lr_p = lr if p.ndim >= 2 else other_lr
                key = (lr_p, tuple(group["adam_betas"]), group["eps"], group["weight_decay"], group["weight_decay_mode"],
                       p.device, p.dtype)
                buckets.setdefault(key, (group, []))[1].append(p)
        for key, (group, ps) in buckets.items():
            self._adam_kernel(ps, ps, [self._adam_state(p) for p in ps], key[0], group)
        return done

    def _fused_adam(self, group: dict, lr: float, other_lr: float) -> dict:
        """Adam on the whole group with torch's fused kernel (the per-parameter path costs
        several times more), run on copies: the changes are returned by ``id(param)``, to be
        written through the writer (a group Adam updates in place, with the exact writer and no
        error feedback, went through :meth:`_fused_adam_joint`)."""
        out = {}
        ps = [p for p in group["params"] if p.grad is not None]
        for lr_p, sel in ((lr, [p for p in ps if p.ndim >= 2]), (other_lr, [p for p in ps if p.ndim < 2])):
            if not sel:
                continue
            targets = [p.detach().clone() for p in sel]
            self._adam_kernel(targets, sel, [self._adam_state(p) for p in sel], lr_p, group)
            for p, t in zip(sel, targets):
                out[id(p)] = t.sub_(p)
        return out

    def __del__(self):
        for h in getattr(self, "_hooks", []):
            h.remove()


class SDMEPOptimizer(SMEPOptimizer):
    """Spectral Dion-Muon EP: Dion low-rank updates (rank ⌈rank_frac · min(m, n)⌉) for matrices
    with more than ``dion_thresh`` entries, Muon (Newton–Schulz) for the other matrices, Adam for
    the rest; everything else as :class:`SMEPOptimizer`."""

    def __init__(self, params, model: nn.Module | None = None, rank_frac: float = 0.2, dion_thresh: float = 1e5, dion_mu: float = 0.95, **kw):
        if isinstance(dion_thresh, bool) or not isinstance(dion_thresh, (int, float)) or dion_thresh < 0:
            raise ConfigError(f"dion_thresh={dion_thresh!r} must be a number ≥ 0")
        DionUpdate(rank_frac=rank_frac)  # validate
        super().__init__(params, model=model, rank_frac=rank_frac, dion_thresh=dion_thresh, dion_mu=dion_mu, **kw)

    def _matrix_rule(self, group: dict, strategies: dict, p: Tensor):
        if p.numel() > group["dion_thresh"]:
            return DionUpdate(rank_frac=group["rank_frac"], mu=group["dion_mu"])
        return strategies["matrix"]

"""The feedforward energy of an ``nn.Sequential``, for EP on ordinary PyTorch models.

The model is cut into blocks g_1 … g_L: each block is one parametrised layer (Linear, Conv2d)
with the parameter-free modules after it (activations, pooling, flatten); parameter-free
modules before the first parametrised layer form a fixed prelude applied to the input. The
states are the block outputs, s_0 = prelude(x) is clamped, and

    E(s) = Σ_l ½ ‖s_l − g_l(s_{l−1})‖²,     F = E + β C(s_L, y)

with C the mean squared error to one-hot targets or the softmax cross-entropy of s_L as logits.
The free phase is the forward pass (E = 0 there, exactly), so it settles in zero steps; nudging
moves the states, and EP's contrast of ∂E/∂θ estimates the gradient of the loss of the forward
pass (it equals backprop's as β → 0; Scellier & Bengio 2017, Whittington & Bogacz 2017).

Gradient: ∂F/∂s_l = e_l − J_{l+1}(s_l)ᵀ e_{l+1} (+ β ∂C/∂s_L), e_l = s_l − g_l(s_{l−1}). The
settle follows a Newton-type flow (see :meth:`SequentialDynamics.field`) that converges in a few
steps whatever the weights' scale; the plain flow −∇F needs dt < 2/(1 + ‖W‖²) and stalls once
training grows the weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mep_hw.errors import ConfigError, DataError

__all__ = ["FeedforwardEnergy", "SequentialDynamics", "SUPPORTED_MODULES", "LOSS_TYPES"]

PARAM_MODULES = (nn.Linear, nn.Conv2d)
FREE_MODULES = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Mish,
)
SUPPORTED_MODULES = tuple(m.__name__ for m in PARAM_MODULES + FREE_MODULES)
LOSS_TYPES = ("mse", "cross_entropy")


def _blocks(model: nn.Sequential):
    if not isinstance(model, nn.Sequential):
        raise ConfigError(
            f"EP mode needs an nn.Sequential, got {type(model).__name__}; supported layers: "
            f"{', '.join(SUPPORTED_MODULES)}"
        )
    prelude: list[nn.Module] = []
    blocks: list[list[nn.Module]] = []
    for i, m in enumerate(model):
        if isinstance(m, nn.Sequential):
            raise ConfigError(f"layer {i} is a nested nn.Sequential; flatten the model into one nn.Sequential")
        if isinstance(m, PARAM_MODULES):
            blocks.append([m])
        elif isinstance(m, FREE_MODULES):
            (blocks[-1] if blocks else prelude).append(m)
        else:
            raise ConfigError(
                f"layer {i} ({type(m).__name__}) is not supported in EP mode: the settle needs a "
                f"deterministic energy of layers it can differentiate block by block. Supported "
                f"layers: {', '.join(SUPPORTED_MODULES)}. Remove it, or use mode='backprop'"
            )
    if not blocks:
        raise ConfigError("the model has no Linear or Conv2d layer: nothing to train")
    return nn.Sequential(*prelude), [nn.Sequential(*b) for b in blocks]


class SequentialDynamics:
    """The settle's view of one batch: the clamped first-block output, β and the target."""

    box = None
    noise_floor = 0.0  # exact float weights

    def __init__(self, energy: "FeedforwardEnergy", first: Tensor, beta, target, shapes):
        self.energy = energy
        self.first = first  # g_1(s_0), (batch, n_1) flattened: constant during a settle
        self.beta = beta
        self.nudged = not (isinstance(beta, float) and beta == 0.0)
        self.target = target
        self.shapes = shapes  # per-block output shapes (without batch)
        self.sizes = tuple(int(torch.Size(s).numel()) for s in shapes)

    def restrict(self, index: Tensor) -> "SequentialDynamics":
        return SequentialDynamics(
            self.energy,
            self.first[index],
            self.beta[index] if isinstance(self.beta, Tensor) else self.beta,
            None if self.target is None else self.target[index],
            self.shapes,
        )

    def nudge(self, beta, target: Tensor) -> "SequentialDynamics":
        first = self.first
        if isinstance(beta, Tensor) and beta.shape[0] != first.shape[0]:
            first = first.repeat(beta.shape[0] // first.shape[0], 1)
        target = self.energy.one_hot(target, self.sizes[-1], first.dtype)
        return SequentialDynamics(self.energy, first, beta, target, self.shapes)

    def field(self, s: Tensor) -> Tensor:
        """ds/dt = T(s) − s, with T the forward pass with the nudge's errors injected:

            T(s)_1 = g_1(s_0) − βδ_1(s),    T(s)_l = g_l(T(s)_{l−1}) − βδ_l(s)

        where δ is ∂C/∂s_L at the current output swept back through the blocks (vector–Jacobian
        products: δ_L = ∂C/∂s_L, δ_{l−1} = J_lᵀ δ_l). Its zeros are the nudged fixed points
        (e_l = −βδ_l ⇔ ∇F = 0). To first order it is the Gauss–Newton-preconditioned gradient
        flow −P∇F, P = (I − 𝒥)⁻¹(I − 𝒥)⁻ᵀ (𝒥 the block-subdiagonal Jacobian), with the linearised
        forward sweep (I − 𝒥)⁻¹ replaced by the forward pass itself; an Euler step of 1 is a
        Newton step, exact to first order in β from the free state. A step costs one backward
        sweep and one forward pass through blocks 2…L (the first block's output is clamped).
        """
        B = s.shape[0]
        views = list(torch.split_with_sizes(s, self.sizes, dim=1))
        L = len(views)
        blocks, shapes = self.energy.blocks, self.shapes
        inj = [None] * L  # −βδ_l
        if self.nudged:
            w = self.energy.cost_grad(views[-1], self.target) * self.beta
            inj[-1] = w
            with torch.enable_grad():
                for l in range(L - 1, 0, -1):  # backward sweep: w ← J_lᵀ w at the current state
                    z = views[l - 1].detach().reshape(B, *shapes[l - 1]).requires_grad_(True)
                    (w,) = torch.autograd.grad(blocks[l](z).reshape(B, -1), z, w)
                    w = w.reshape(B, -1)
                    inj[l - 1] = w
        t = self.first if inj[0] is None else self.first - inj[0]
        out = [t]
        with torch.no_grad():
            for l in range(1, L):
                t = blocks[l](t.reshape(B, *shapes[l - 1])).reshape(B, -1)
                if inj[l] is not None:
                    t = t - inj[l]
                out.append(t)
        return torch.cat(out, dim=1).sub_(s)


class FeedforwardEnergy:
    """EP view of an ``nn.Sequential`` (see the module docstring). It implements the protocol of
    :func:`mep_hw.ep.ep_gradients`: ``check_batch``, ``dynamics``, ``forward_init``,
    ``zero_init``, ``ep_contrast``, ``cost_fn``, ``logits``, ``param_list``."""

    def __init__(self, model: nn.Sequential, loss_type: str = "cross_entropy"):
        if loss_type not in LOSS_TYPES:
            raise ConfigError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
                raise ConfigError(
                    f"{type(m).__name__} is not supported in EP mode (it makes the energy stochastic "
                    f"or batch-dependent); supported layers: {', '.join(SUPPORTED_MODULES)}"
                )
        self.model = model
        self.loss_type = loss_type
        self.prelude, self.blocks = _blocks(model)
        self._shapes: dict[tuple, tuple] = {}

    # ------------------------------------------------------------------ protocol
    def param_list(self) -> list[nn.Parameter]:
        return [p for b in self.blocks for p in b.parameters()]

    def check_batch(self, x: Tensor, y: Tensor | None = None) -> None:
        if not torch.isfinite(x).all():
            raise DataError("input x contains NaN or infinite values; clean the batch before the EP step")
        if y is not None:
            if y.shape[0] != x.shape[0]:
                raise ConfigError(f"target has {y.shape[0]} rows but x has {x.shape[0]}")
            if y.is_floating_point() and not torch.isfinite(y).all():
                raise DataError("target contains NaN or infinite values")

    def forward_states(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(s_0, [s_1 … s_L]) of the forward pass, states flattened to (batch, n_l)."""
        with torch.no_grad():
            h = self.prelude(x)
            s0 = h
            states = []
            for b in self.blocks:
                h = b(h)
                states.append(h)
        self._shapes[tuple(x.shape[1:])] = tuple(t.shape[1:] for t in states)
        return s0, [t.reshape(t.shape[0], -1) for t in states]

    def dynamics(self, x: Tensor, *, beta=0.0, target=None, check: bool = True, free_states=None) -> SequentialDynamics:
        if check:
            self.check_batch(x, target)
        if free_states is None:
            _, free_states = self.forward_states(x)
        key = tuple(x.shape[1:])
        if key not in self._shapes:
            self.forward_states(x[:1])
        if target is not None:
            target = self.one_hot(target, free_states[-1].shape[1], free_states[-1].dtype)
        return SequentialDynamics(self, free_states[0], beta, target, self._shapes[key])

    def forward_init(self, dyn: SequentialDynamics) -> list[Tensor]:
        """The free fixed point: the forward pass (recomputed from the first block's output)."""
        h = dyn.first
        out = [h]
        with torch.no_grad():
            for b, sh in zip(self.blocks[1:], dyn.shapes[:-1]):
                h = b(h.reshape(h.shape[0], *sh)).reshape(h.shape[0], -1)
                out.append(h)
        return out

    def zero_init(self, x: Tensor) -> list[Tensor]:
        raise ConfigError("the feedforward energy starts from the forward pass; use init='forward'")

    @staticmethod
    def one_hot(target: Tensor, n_out: int, dtype: torch.dtype) -> Tensor:
        """Targets as (batch, n_out): integer labels are one-hot encoded, others kept."""
        if target.ndim == 1 and not target.is_floating_point():
            if target.numel() and (int(target.min()) < 0 or int(target.max()) >= n_out):
                raise ConfigError(f"labels must lie in [0, {n_out}); got {int(target.min())}…{int(target.max())}")
            return torch.nn.functional.one_hot(target.long(), n_out).to(dtype)
        if target.ndim != 2 or target.shape[1] != n_out:
            raise ConfigError(
                f"target has shape {tuple(target.shape)}; pass integer labels (batch,) or a (batch, {n_out}) tensor"
            )
        return target.to(dtype)

    def cost_grad(self, out: Tensor, target: Tensor) -> Tensor:
        """∂C/∂s_L per sample (target one-hot)."""
        if self.loss_type == "mse":
            return out - target
        return torch.softmax(out, dim=1) - target

    def cost_fn(self, states: Sequence[Tensor], target: Tensor) -> Tensor:
        out = states[-1]
        target = self.one_hot(target, out.shape[1], out.dtype)
        if self.loss_type == "mse":
            return 0.5 * ((out - target) ** 2).sum(1)
        return -(torch.log_softmax(out, dim=1) * target).sum(1)

    def logits(self, states: Sequence[Tensor]) -> Tensor:
        return states[-1]

    def block_contrast(self, l: int, s_prev_a: Tensor, s_a: Tensor, s_prev_b: Tensor, s_b: Tensor, shape_prev) -> list[Tensor]:
        """Block l's part of [∂E/∂θ_l(a) − ∂E/∂θ_l(b)], from its own pre- and post-synaptic
        states only: ∂E_l/∂θ_l = −J_θ g_l(s_{l−1})ᵀ e_l, batch-summed."""
        block = self.blocks[l]
        params = list(block.parameters())
        B = s_a.shape[0]
        with torch.enable_grad():
            if l == 0 and s_prev_b is s_prev_a:  # clamped input: one pass serves both phases
                out = block(s_prev_a.reshape(B, *shape_prev)).reshape(B, -1)
                J = -((s_a - s_b) * out).sum()
            else:
                out_a = block(s_prev_a.reshape(B, *shape_prev)).reshape(B, -1)
                out_b = block(s_prev_b.reshape(B, *shape_prev)).reshape(B, -1)
                J = -((s_a - out_a.detach()) * out_a).sum() + ((s_b - out_b.detach()) * out_b).sum()
            return list(torch.autograd.grad(J, params))

    def _layout(self, x: Tensor):
        s0 = self.prelude(x).detach()
        shapes = [tuple(s0.shape[1:])] + list(self._shapes[tuple(x.shape[1:])][:-1])
        return s0.reshape(s0.shape[0], -1), shapes

    def ep_contrast(self, x: Tensor, sa, beta_a: float, sb, beta_b: float, target: Tensor) -> list[Tensor]:
        """[∂F/∂θ(s^a, β_a) − ∂F/∂θ(s^b, β_b)] / (β_a − β_b), batch-averaged, in the order of
        :meth:`param_list`, by autograd of the total energy E(s^a) − E(s^b) (C does not depend
        on θ). The clamped first block is evaluated once for both phases."""
        s0, shapes = self._layout(x)
        B = s0.shape[0]
        with torch.enable_grad():
            g1 = self.blocks[0](s0.reshape(B, *shapes[0])).reshape(B, -1)
            J = 0.5 * (((sa[0] - g1) ** 2).sum() - ((sb[0] - g1) ** 2).sum())
            for l in range(1, len(self.blocks)):
                ga = self.blocks[l](sa[l - 1].reshape(B, *shapes[l])).reshape(B, -1)
                gb = self.blocks[l](sb[l - 1].reshape(B, *shapes[l])).reshape(B, -1)
                J = J + 0.5 * (((sa[l] - ga) ** 2).sum() - ((sb[l] - gb) ** 2).sum())
            grads = torch.autograd.grad(J, self.param_list())
        k = 1.0 / ((beta_a - beta_b) * B)
        return [g.mul_(k) for g in grads]

    def local_contrast(self, x: Tensor, sa, beta_a: float, sb, beta_b: float, target: Tensor) -> list[Tensor]:
        """The same estimate computed block by block: block l's update is a function of its own
        pre- and post-synaptic states (s_{l−1}, s_l) in the two phases and nothing else
        (:meth:`block_contrast`)."""
        s0, shapes = self._layout(x)
        k = 1.0 / ((beta_a - beta_b) * s0.shape[0])
        grads = []
        for l in range(len(self.blocks)):
            prev_a = s0 if l == 0 else sa[l - 1]
            prev_b = prev_a if l == 0 else sb[l - 1]
            grads += [g.mul_(k) for g in self.block_contrast(l, prev_a, sa[l], prev_b, sb[l], shapes[l])]
        return grads

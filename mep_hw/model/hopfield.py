"""Layered Hopfield network: its energy, the analytic vector field −∂F/∂s and ∂F/∂θ.

Energy (Scellier & Bengio 2017, eq. 1), with states s_1..s_L, input clamped as ρ(s_0) := x::

    E(s) = ½ Σ_l ‖s_l‖² − Σ_l ρ(s_{l+1})ᵀ W_l ρ(s_l) − Σ_l b_lᵀ ρ(s_l)

Cost, either mean squared error on the output state or a softmax cross-entropy readout
(Laborieux et al. 2021, where the last weight matrix reads the last state out and is not part of
E)::

    C_mse(s) = ½ ‖s_L − y‖²          C_ce(s) = −log softmax(W_out ρ(s_L) + b_out)_y

Total energy F = E + βC. The settle integrates ds/dt = −∂F/∂s (time in units of τ)::

    −∂F/∂s_l = −s_l + ρ'(s_l) ⊙ (W_{l−1} ρ(s_{l−1}) + W_lᵀ ρ(s_{l+1}) + b_l) − β ∂C/∂s_l

For an activation with a box (the hard sigmoid) the states stay in the box [0, 1], where
ρ(s) = s and ρ'(s) = 1; the settle engine projects every state it evaluates onto the box.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from mep_hw.errors import ConfigError, DataError
from mep_hw.hw.store import ExactOp, IdealStore, WeightStore, rms_noise_floor
from mep_hw.model.activations import Activation, get_activation
from mep_hw.model.holomorphic import ComplexReads, softmax

__all__ = ["COSTS", "DenseCoupling", "LayeredHopfield", "HopfieldDynamics", "StoreReads"]

COSTS = ("mse", "ce")


def _check_finite(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(dim=1).nonzero().flatten()
        raise DataError(
            f"{name} contains NaN or infinite values (samples {bad[:8].tolist()}"
            f"{' …' if bad.numel() > 8 else ''}); clean or drop these samples before settling"
        )


# The input-weight contrast Δᵀx skips the samples whose first hidden layer did not move between
# the two phases (a zero row of Δ adds nothing) when they are at least this fraction of the batch
# (CPU only: selecting them elsewhere is a host synchronisation). Late in training most samples
# settle at their free state under the nudge (their output already at the target): measured on
# 784-500-10 (docs/training.md), the product then costs its moving rows only.
SPARSE_CONTRAST_FRAC = 0.25


def _moving_rows_product(delta: Tensor, x: Tensor) -> Tensor:
    """deltaᵀ x, summed over the rows where ``delta`` is not all zero (all rows when too few are
    zero or off the CPU): the same sum, in another summation order."""
    if delta.device.type != "cpu" or delta.is_complex() or delta.shape[0] < 8:
        return delta.T @ x
    # rows with any nonzero (or NaN: amax propagates it, and NaN ≠ 0) entry; |Δ|.amax is ~5× faster than ne().any()
    idx = delta.abs().amax(1).ne(0).nonzero().squeeze(1)
    if idx.numel() > (1.0 - SPARSE_CONTRAST_FRAC) * delta.shape[0]:
        return delta.T @ x
    return delta.index_select(0, idx).T @ x.index_select(0, idx)


DenseCoupling = ExactOp  # an exact weight matrix as a read operator (mep_hw.hw.store)


class HopfieldDynamics:
    """The vector field of one batch: the input, the target and β are bound.

    Implements the protocol of the settle engine: ``sizes``, ``box``, ``noise_floor``,
    ``field(s)`` on the packed state (batch, Σ n_l) and ``restrict(index)``. ``beta`` is a float
    or a (batch, 1) tensor (one β per sample, so the ±β phases of the symmetric estimator settle
    as one batch). The weights are read through the operators ``ops`` of a weight store (one per
    weight matrix). The input x is clamped for the whole phase, so the input array is read once
    per phase: the drive W₀x + b₀ (``input_drive``; on a device one read with its DAC, noise and
    ADC, held for the phase) is computed when the phase's dynamics is made (:meth:`nudge` makes a
    new phase and reads it again). ``noise_floor`` is the rms noise per state component of one
    field evaluation (0 for exact weights): the settle cannot get below it.
    """

    def __init__(
        self,
        *,
        ops: Sequence,
        biases: Sequence[Tensor],
        act: Activation,
        cost: str,
        x: Tensor,
        input_drive: Tensor,
        beta: float | Tensor,
        target: Tensor | None,
        noise_floor: float = 0.0,
        noise_vars: tuple[float, ...] | None = None,
        noise_fn=None,
    ):
        self.ops = tuple(ops)
        self.biases = tuple(biases)
        self.act = act
        self.cost = cost
        self.x = x
        self.input_drive = input_drive
        self.beta = beta
        self.nudged = not (isinstance(beta, float) and beta == 0.0)
        self.target = target
        self.box = act.box
        self.n_states = len(self.ops) - (1 if cost == "ce" else 0)
        self.sizes = tuple(op.shape[0] for op in self.ops[: self.n_states])
        self.noise_fn = noise_fn
        self.noise_floor, self.noise_vars = _noise_of_phase(noise_fn, beta, self.sizes, noise_floor, noise_vars)
        if self.box is not None and cost == "mse" and self.nudged:
            self._out_scale, self._out_shift, self._out_concave = _mse_output_map(beta, target)

    def _with(self, same_phase: bool = False, **kw) -> "HopfieldDynamics":
        """A copy with ``kw`` replaced; a new phase (``same_phase`` False) has its noise recomputed."""
        args = dict(ops=self.ops, biases=self.biases, act=self.act, cost=self.cost, x=self.x,
                    input_drive=self.input_drive, beta=self.beta, target=self.target, noise_floor=self.noise_floor,
                    noise_vars=_kept_noise_vars(self, same_phase), noise_fn=self.noise_fn)
        args.update(kw)
        return HopfieldDynamics(**args)

    def restrict(self, index: Tensor) -> "HopfieldDynamics":
        return self._with(
            same_phase=True,
            x=self.x[index],
            input_drive=self.input_drive[index],
            beta=self.beta[index] if isinstance(self.beta, Tensor) else self.beta,
            target=None if self.target is None else self.target[index],
        )

    def drive0(self) -> Tensor:
        """W₀x + b₀, read once for the phase."""
        return self.input_drive

    def nudge(self, beta: float | Tensor, target: Tensor) -> "HopfieldDynamics":
        """The same batch at nudging strength ``beta`` towards ``target``: a new phase (the input
        array is read again, unless it is exact). A (k·batch, 1) tensor of β repeats the batch k
        times (target given for all k·batch rows), so several nudged phases settle together."""
        x, drive = self.x, self.input_drive
        if isinstance(beta, Tensor) and beta.shape[0] != x.shape[0]:
            k = beta.shape[0] // x.shape[0]
            x = x.repeat(k, 1)
            drive = drive.repeat(k, 1)
        if not getattr(self.ops[0], "exact", False):
            drive = self.ops[0].mvm(x, self.biases[0])
        return self._with(x=x, input_drive=drive, beta=beta, target=target)

    def drives(self, rho: Sequence[Tensor]) -> list[Tensor]:
        """d_l = W_{l−1}ρ(s_{l−1}) + W_lᵀρ(s_{l+1}) + b_l − β ∂C/∂ρ(s_l) (the CE readout's
        nudge acts through ρ(s_L); the MSE nudge acts on s_L itself and is not included)."""
        inb = self.box is not None  # states of a box activation lie in [0, 1], within the DAC bound
        return [self._drive(l, rho, inb) for l in range(self.n_states)]

    def _drive(self, l: int, rho: Sequence[Tensor], inb: bool) -> Tensor:
        """d_l of :meth:`drives`, reading only the arrays that feed layer l."""
        n, ops, b = self.n_states, self.ops, self.biases
        d = self.drive0() if l == 0 else ops[l].mvm(rho[l - 1], b[l], x_in_bound=inb)
        if l + 1 < n:
            d = ops[l + 1].mvm_t(rho[l + 1], d, x_in_bound=inb)
        if l == n - 1 and self.cost == "ce" and self.nudged:
            logits = ops[-1].mvm(rho[-1], b[-1], x_in_bound=inb)
            err = (softmax(logits, dim=1) - self.target) * self.beta
            d = ops[-1].mvm_t(err.neg_(), d)
        return d

    def _box_target(self, d: Tensor, s_last: Tensor) -> Tensor:
        """The MSE output's relaxation target before the clip, a·d + c − b·s_L (see
        :func:`_mse_output_map`); a new tensor."""
        a, c, concave = self._out_scale, self._out_shift, self._out_concave
        out = torch.addcmul(c, d, a) if isinstance(a, Tensor) else torch.add(c, d, alpha=a)
        if concave is not None:  # rows with 1 + β ≤ 0: d − β(s_L − y), the βy part is in c
            out = torch.addcmul(out, s_last, concave, value=-1.0)
        return out

    def _block_targets(self, s: Sequence[Tensor], parity: int):
        """(l, target before the clip) for every layer l ≡ parity (mod 2), from the states ``s``
        (per-layer tensors, in the box)."""
        if self.box is None:
            raise ConfigError(
                f"the block solver needs an activation with a box, where each layer's minimiser of F given "
                f"its neighbours is the clip of its drive (hard_sigmoid); activation {self.act.name!r} has "
                "none (its per-layer minimiser has no closed form): use an ODE solver (euler, heun, rk4, "
                "bosh3, dopri5)"
            )
        n = self.n_states
        mse_out = self.cost == "mse" and self.nudged
        for l in range(parity, n, 2):
            d = self._drive(l, s, True)
            if l == n - 1 and mse_out:
                d = self._box_target(d, s[-1])
            yield l, d

    def block_field(self, s: Sequence[Tensor], parity: int, out: Sequence[Tensor]) -> None:
        """Write the field f_l(s) = clip(d_l) − s_l (as :meth:`field`) of every layer l ≡ parity
        (mod 2) into ``out[l]``; ``s`` and ``out`` are per-layer tensors (e.g. views of packed
        states). Reads only the arrays that feed those layers.

        s_l + f_l(s) is the exact minimiser of F over s_l ∈ [0, 1]ᴺ given the other layers (F is
        separable per unit in s_l: ½s² − s·d_l, and layers of one parity do not interact), so
        alternating the two parities is exact block coordinate descent (F never increases) —
        including the MSE output under nudging, whose minimiser is clip((d + βy)/(1 + β)). Two
        cases are a well-defined inexact step, with the same fixed points as the ODE: the MSE
        output where 1 + β ≤ 0 (F concave in s_L; the field's step clip(d + βy − βs_L), a
        projected gradient step of unit length, which does not increase F), and the last hidden
        layer under the CE readout's nudge (the readout couples the units through the softmax:
        the step clip(d_L − βW_outᵀ(softmax(W_out s_L + b_out) − y)) linearises the readout at the
        current s_L, a projected gradient step of unit length on a 1-strongly convex block; it
        does not increase F when β·‖W_out‖₂²/2 < 1, since the softmax's Hessian is ≤ ½). The free
        phase of the CE network is exact (the readout is not part of E)."""
        lo, hi = self.box or (None, None)  # without a box _block_targets raises
        for l, d in self._block_targets(s, parity):
            torch.clamp(d, lo, hi, out=out[l]).sub_(s[l])

    def block_update(self, s: Sequence[Tensor], parity: int) -> None:
        """Set every layer l ≡ parity (mod 2) of the per-layer states ``s``, in place, to its block
        target clip(d_l) = s_l + f_l(s) (see :meth:`block_field`)."""
        lo, hi = self.box or (None, None)  # without a box _block_targets raises
        for l, d in self._block_targets(s, parity):
            torch.clamp(d, lo, hi, out=s[l])

    @property
    def row_work(self) -> float:
        """Work of one field evaluation per sample, in multiply-accumulates (every array read
        forward, the inter-layer arrays also transposed, the input array only when its drive is
        not held, the CE readout both ways when nudged) plus ~8 element operations per state
        component: what a finished sample left in the working batch costs per evaluation."""
        sz, n = self.sizes, self.n_states
        macs = 0 if self.input_drive is not None else self.x.shape[1] * sz[0]
        macs += sum(2 * sz[l - 1] * sz[l] for l in range(1, n))
        if self.cost == "ce" and self.nudged:
            macs += 2 * sz[-1] * self.biases[-1].shape[0]
        return float(macs + 8 * sum(sz))

    def grad_energy(self, states: Sequence[Tensor]) -> list[Tensor]:
        """∂F/∂s_l = s_l − ρ'(s_l) ⊙ d_l + β ∂C/∂s_l, per layer, for any states."""
        d = self.drives([self.act.fn(t) for t in states])
        g = [torch.addcmul(t, self.act.deriv(t), dl, value=-1.0) for t, dl in zip(states, d)]
        if self.cost == "mse" and self.nudged:
            g[-1] = g[-1] + (states[-1] - self.target) * self.beta
        return g

    def field(self, s: Tensor) -> Tensor:
        """The settle's vector field ds/dt on the packed state s = [s_1, …, s_L].

        Without a box: −∂F/∂s. With a box [lo, hi] (states kept inside it, where ρ(s) = s and
        ρ'(s) = 1): the projected-gradient flow ds/dt = Π(s − ∂F/∂s) − s = clip(d, lo, hi) − s
        (the MSE nudge −β(s_L − y) inside the clip). It has the fixed points of the projected
        gradient flow of F on the box, F decreases along it (dF/dt ≤ −‖ds/dt‖², the projection
        inequality), and it is the rate equation τ ds/dt = −s + ρ(drive) of an analog neuron
        with a saturating amplifier.
        """
        views = torch.split_with_sizes(s, self.sizes, dim=1)
        if self.box is None:
            return torch.cat(self.grad_energy(views), dim=1).neg_()
        d = self.drives(views)
        if self.cost == "mse" and self.nudged:
            d[-1] = self._box_target(d[-1], views[-1])
        f = torch.cat(d, dim=1) if len(d) > 1 else d[0].clone()
        return f.clamp_(self.box[0], self.box[1]).sub_(s)


def _noise_of_phase(noise_fn, beta, sizes, noise_floor: float, noise_vars):
    """(noise_floor, noise_vars) of a phase: as given when ``noise_vars`` is (the same phase, e.g.
    restricted to some rows) or there is no ``noise_fn``, else from ``noise_fn(max |β|)``."""
    if noise_fn is None or noise_vars is not None:
        return float(noise_floor), noise_vars
    v = tuple(noise_fn(_beta_max(beta)))
    return rms_noise_floor(list(zip(v, sizes))), v


def _kept_noise_vars(dyn, same_phase: bool):
    """The ``noise_vars`` a copy of ``dyn`` takes over: its own for the same phase (or when it has
    no ``noise_fn`` to recompute them), None — recomputed by :func:`_noise_of_phase` — for a new one."""
    return dyn.noise_vars if same_phase or dyn.noise_fn is None else None


def _beta_max(beta: float | Tensor) -> float:
    """The largest |β| of a phase (a per-row tensor: its maximum, one host read per phase)."""
    return float(beta.abs().max()) if isinstance(beta, Tensor) else float(abs(beta))


def _noise_vars(store, n_states: int, cost: str, beta: float, reads) -> tuple[float, ...]:
    """Per state layer, the field noise variance of one evaluation (see
    :meth:`LayeredHopfield.noise_vars`). ``reads(l)`` = (the factor on the variance of array l's
    forward read as it reaches its state: 1, or 1/p² through an average pool of size p; the reads
    of array l that sum into one output of its transpose read: a convolution's k², 1 for a
    matrix; the rms of that transpose read's inputs)."""
    if store.exact:
        return (0.0,) * n_states
    out = []
    for l in range(n_states):
        v = 0.0
        if l > 0:  # the input drive (l = 0) is held
            v += reads(l)[0] * store.noise_rms(l, 0.5) ** 2
        if l + 1 < n_states:  # the transpose read from the layer above
            _, k, x_rms = reads(l + 1)
            v += k * store.noise_rms(l + 1, x_rms, transpose=True) ** 2
        elif cost == "ce" and beta > 0:  # the readout's nudge, read back through its transpose
            n_cls = store.ops[n_states].shape[0]
            v += store.noise_rms(n_states, beta * math.sqrt(2.0 / n_cls), transpose=True) ** 2
        out.append(v)
    return tuple(out)


def _mse_output_map(beta: float | Tensor, target: Tensor):
    """Constants of the MSE output's relaxation target s_L − D⁻¹∂F/∂s_L = a·d_L + c − b·s_L.

    F is quadratic in each output unit, ½(1+β)s² − s(d + βy), so with D = 1 + β the target is
    its exact per-unit minimiser (d + βy)/(1 + β): a = 1/(1+β), c = βy/(1+β), b = 0. Where
    1 + β ≤ 0 (F concave in s_L) D = 1 is used: a = 1, c = βy, b = β.
    """
    if not isinstance(beta, Tensor):
        if beta > -1.0:
            return 1.0 / (1.0 + beta), target * (beta / (1.0 + beta)), None
        return 1.0, target * beta, target.new_full((target.shape[0], 1), beta)
    ok = beta > -1.0
    a = torch.where(ok, 1.0 / (1.0 + beta.clamp_min(-0.5)), 1.0)  # clamp only guards unused rows
    c = target * (beta * a)
    # the host reads whether any row is concave only on the CPU (free there); elsewhere that read
    # is a synchronisation, and the term, zero for every convex row, is kept instead
    if beta.device.type == "cpu" and bool(ok.all()):
        return a, c, None
    concave = torch.where(ok, 0.0, beta)
    return a, c, concave


class StoreReads:
    """The weight store of a network (:mod:`mep_hw.hw.store`): where its weight matrices live and
    are read from; exact float weights (the parameters themselves) unless :meth:`use_store` gave
    a device store. For an ``nn.Module`` with ``weights`` (and ``biases``) ParameterLists."""

    _store: WeightStore | None = None

    @property
    def store(self) -> WeightStore:
        if self._store is None:
            self._store = IdealStore(list(self.weights))
        return self._store

    def noise_floor(self, beta: float = 0.0) -> float:
        """rms over all state components of ``noise_vars(beta)``; 0 on exact weights."""
        return rms_noise_floor(list(zip(self.noise_vars(beta), self.state_sizes)))

    def noise_fn(self):
        """β ↦ ``noise_vars`` for a dynamics (recomputed by each phase); None on exact weights."""
        return None if self.store.exact else self.noise_vars

    def use_store(self, store: WeightStore):
        """Hold the weight matrices in ``store`` (made over ``list(self.weights)``)."""
        if len(store) != len(self.weights) or any(store.index(w) != k for k, w in enumerate(self.weights)):
            raise ConfigError("the store must hold this network's weight matrices, in order (build it over list(model.weights))")
        self._store = store
        return self

    def store_ops(self, complex_reads: bool = False) -> tuple:
        """The store's read operators; with ``complex_reads`` a device read of a complex input is
        two real reads (:class:`~mep_hw.model.holomorphic.ComplexReads`; exact weights take complex
        inputs as they are)."""
        ops = self.store.ops
        if complex_reads and not self.store.exact:
            ops = tuple(ComplexReads(op) for op in ops)
        return ops

    # the readout and the cost, shared by the layered and the convolutional networks (which give
    # ``cost``, ``act``, ``weights``, ``biases`` and ``energy``)
    def logits(self, states: Sequence[Tensor]) -> Tensor:
        """The network's output scores: the output state (mse) or the readout logits (ce), read
        through the store like every other weight (differentiable on exact weights)."""
        if self.cost == "mse":
            return states[-1]
        r = self.act.fn(states[-1])
        if self.store.exact:  # the parameter itself: differentiable, complex inputs read as they are
            return ExactOp(self.weights[-1]).mvm(r, self.biases[-1])
        b = None if self.store.holds_biases else self.biases[-1].detach()
        return self.store_ops(r.is_complex())[-1].mvm(r, b, x_in_bound=self.act.box is not None)

    def cost_fn(self, states: Sequence[Tensor], target: Tensor) -> Tensor:
        """C(s) per sample, shape (batch,)."""
        if self.cost == "mse":
            return 0.5 * ((states[-1] - target) ** 2).sum(1)
        return -(torch.log_softmax(self.logits(states), dim=1) * target).sum(1)

    def total_energy(self, x: Tensor, states: Sequence[Tensor], beta: float, target: Tensor | None) -> Tensor:
        """F = E + βC per sample."""
        f = self.energy(x, states)
        if beta != 0.0:
            f = f + beta * self.cost_fn(states, target)
        return f


class LayeredHopfield(StoreReads, nn.Module):
    """A layered Hopfield network of any depth for EP (see the module docstring for F).

    ``layers`` lists the layer sizes from input to output, e.g. ``(784, 500, 10)``. With
    ``cost='mse'`` every layer after the input is a dynamic state; with ``cost='ce'`` the last
    weight matrix is a softmax readout of the last hidden state (at least one hidden layer).
    Weights follow ``nn.Linear``: ``weights[l]`` has shape ``(layers[l+1], layers[l])``.
    """

    def __init__(
        self,
        layers: Sequence[int],
        *,
        activation: str = "hard_sigmoid",
        cost: str = "mse",
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        layers = tuple(int(n) for n in layers)
        if len(layers) < 2 or any(n < 1 for n in layers):
            raise ConfigError(
                f"layers={layers} is invalid; give at least an input and an output size, all ≥ 1 "
                "(e.g. 784,500,10)"
            )
        if cost not in COSTS:
            raise ConfigError(f"unknown cost {cost!r}; valid costs: {', '.join(COSTS)}")
        if cost == "ce" and len(layers) < 3:
            raise ConfigError(
                f"cost='ce' uses the last weight matrix as a readout and needs at least one hidden "
                f"layer, but layers={layers}; add a hidden layer or use cost='mse'"
            )
        self.layers = layers
        self.act = get_activation(activation)
        self.cost = cost
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for n_in, n_out in zip(layers[:-1], layers[1:]):
            # U(±1/√fan_in), the nn.Linear default: about half Glorot's bound for 784-500-10,
            # which keeps the hard-sigmoid output units away from saturation at the start.
            bound = 1.0 / math.sqrt(n_in)
            w = torch.empty(n_out, n_in, dtype=dtype, device=device)
            w.uniform_(-bound, bound, generator=generator)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(n_out, dtype=dtype, device=device)))

    def noise_vars(self, beta: float = 0.0) -> tuple[float, ...]:
        """Per state layer, the variance (per component) of the noise of one field evaluation read
        through the store: the read, output and ADC noise of the arrays read at every evaluation
        (the forward read from the layer below and the transpose read from the layer above), for
        inputs of rms 0.5 (states in [0, 1]). The input array is not among them: its drive is read
        once per phase and held, a constant of the settle (its noise moves the fixed point, not the
        residual). Under a CE readout's nudge (|``beta``| > 0) the last state also gets the
        transpose read of β·(softmax − y), of rms |β|·√(2/classes) per component. All 0 on exact
        weights."""
        return _noise_vars(self.store, self.n_states, self.cost, beta, lambda l: (1.0, 1, 0.5))

    # ----------------------------------------------------------------- structure
    @property
    def n_states(self) -> int:
        return len(self.layers) - (2 if self.cost == "ce" else 1)

    @property
    def state_sizes(self) -> tuple[int, ...]:
        return self.layers[1 : 1 + self.n_states]

    def positions(self) -> tuple[int, ...]:
        """Reads of each weight per sample and evaluation (dense: one; see :meth:`ConvHopfield.positions`)."""
        return (1,) * len(self.weights)

    def param_list(self) -> list[nn.Parameter]:
        """Parameters in the order of :meth:`ep_contrast`: W_0, b_0, W_1, b_1, …"""
        out = []
        for w, b in zip(self.weights, self.biases):
            out += [w, b]
        return out

    # ----------------------------------------------------------------- inputs
    def check_batch(self, x: Tensor, y: Tensor | None = None) -> None:
        """Validate shapes and values of a batch; raises ConfigError or DataError."""
        if x.ndim != 2 or x.shape[1] != self.layers[0]:
            raise ConfigError(
                f"input x has shape {tuple(x.shape)} but the network expects (batch, "
                f"{self.layers[0]}); flatten images and check --layers"
            )
        _check_finite("input x", x)
        if y is not None:
            if y.shape != (x.shape[0], self.layers[-1]):
                raise ConfigError(
                    f"target has shape {tuple(y.shape)} but expected (batch={x.shape[0]}, "
                    f"{self.layers[-1]}); pass one-hot targets (see mep_hw.model.one_hot)"
                )
            _check_finite("target", y)

    def dynamics(
        self, x: Tensor, *, beta: float | Tensor = 0.0, target: Tensor | None = None, check: bool = True,
        free_states=None, complex_reads: bool = False,
    ) -> HopfieldDynamics:
        """The vector field for batch ``x`` at nudging strength ``beta`` towards ``target``,
        reading the weights through :attr:`store` (the input drive W₀x + b₀ once, here), with the
        store's noise floor. ``complex_reads``: the states will be complex (holomorphic EP), each
        complex read of a device is two real reads. (``free_states`` is accepted for protocol
        compatibility; it implies nothing here.)
        """
        if isinstance(beta, Tensor):
            if beta.shape != (x.shape[0], 1):
                raise ConfigError(f"a per-sample beta must have shape (batch, 1), got {tuple(beta.shape)}")
        else:
            beta = float(beta)
        if check:
            self.check_batch(x, target)
            if not bool(torch.isfinite(torch.as_tensor(beta)).all()):
                raise ConfigError(f"beta={beta} is not finite; use a finite nudging strength")
        if not (isinstance(beta, float) and beta == 0.0) and target is None:
            raise ConfigError("a nudged phase (beta ≠ 0) needs a target")
        ops = self.store_ops(complex_reads)
        # analog biases are read with their arrays (a column driven by 1): nothing to add on the host
        b = [None] * len(ops) if self.store.holds_biases else [v.detach() for v in self.biases]
        return HopfieldDynamics(ops=ops, biases=b, act=self.act, cost=self.cost, x=x, input_drive=ops[0].mvm(x, b[0]),
                                beta=beta, target=target, noise_fn=self.noise_fn())

    def forward_init(self, dyn: HopfieldDynamics) -> list[Tensor]:
        """A feed-forward pass s_l = ρ(W_{l−1}ρ(s_{l−1}) + b_l): the usual warm start of the
        free phase (each state sees its bottom-up drive only), read through the same operators."""
        act, ops, b = self.act, dyn.ops, dyn.biases
        inb = act.box is not None
        s = [act.fn(dyn.drive0())]
        for l in range(1, self.n_states):
            s.append(act.fn(ops[l].mvm(s[-1], b[l], x_in_bound=inb)))
        return s

    def zero_init(self, x: Tensor) -> list[Tensor]:
        return [x.new_zeros(x.shape[0], n) for n in self.state_sizes]

    def rho(self, states: Sequence[Tensor]) -> list[Tensor]:
        """ρ of settled states (identity for a box activation: settled states lie in its box)."""
        if self.act.box is not None:
            return list(states)
        return [self.act.fn(s) for s in states]

    # ----------------------------------------------------------------- energies (autograd-able)
    def energy(self, x: Tensor, states: Sequence[Tensor]) -> Tensor:
        """E(s) per sample, shape (batch,)."""
        rho = [x] + [self.act.fn(s) for s in states]
        e = sum(0.5 * (s * s).sum(1) for s in states)
        for l in range(self.n_states):
            e = e - ((rho[l] @ self.weights[l].T) * rho[l + 1]).sum(1) - rho[l + 1] @ self.biases[l]
        return e

    # ----------------------------------------------------------------- EP parameter gradients
    @torch.no_grad()
    def ep_contrast(
        self,
        x: Tensor,
        sa: Sequence[Tensor],
        beta_a: float,
        sb: Sequence[Tensor],
        beta_b: float,
        target: Tensor,
    ) -> list[Tensor]:
        """[∂F/∂θ(s^a, β_a) − ∂F/∂θ(s^b, β_b)] / (β_a − β_b), batch-averaged, as local
        Hebbian terms (Scellier & Bengio 2017, eq. 13): for W_l it is
        −[ρ(s^a_{l+1}) ρ(s^a_l)ᵀ − ρ(s^b_{l+1}) ρ(s^b_l)ᵀ] / (β_a − β_b).
        Returned in the order of :meth:`param_list`.
        """
        k = 1.0 / ((beta_a - beta_b) * x.shape[0])
        ra = [x] + self.rho(sa)
        rb = [x] + self.rho(sb)
        grads = []
        for l in range(self.n_states):
            if l == 0:  # the input is clamped: one product instead of two
                gw = _moving_rows_product(rb[1] - ra[1], x)
            else:
                gw = torch.addmm(rb[l + 1].T @ rb[l], ra[l + 1].T, ra[l], alpha=-1.0)
            grads += [gw.mul_(k), (rb[l + 1] - ra[l + 1]).sum(0).mul_(k)]
        if self.cost == "ce":  # ∂(βC)/∂θ for the readout: β (p − y) ρ(s_L)ᵀ
            ea = (softmax(self.logits(sa), 1) - target) * beta_a
            eb = (softmax(self.logits(sb), 1) - target) * beta_b
            gw = torch.addmm(ea.T @ ra[-1], eb.T, rb[-1], alpha=-1.0)
            grads += [gw.mul_(k), (ea - eb).sum(0).mul_(k)]
        return grads

    @torch.no_grad()
    def hebbian_terms(self, x: Tensor, states: Sequence[Tensor], beta: float, target: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per weight matrix, the (post d, pre a) activities of one phase whose outer products
        d aᵀ make the EP update: ΔW_l = η/(β_a − β_b) · Σ_batch (d aᵀ|_a − d aᵀ|_b), the biases
        the same with a = 1 — :meth:`ep_contrast` is −1/B times it. For a Hopfield layer
        d = ρ(s_{l+1}), a = ρ(s_l) (a = x for the input); for the CE readout d = −β(p − y), a = ρ(s_L).
        An in-array update applies each phase's terms as pulse coincidences (:mod:`mep_hw.hw.pulses`)."""
        r = [x] + self.rho(states)
        terms = [(r[l + 1], r[l]) for l in range(self.n_states)]
        if self.cost == "ce":
            terms.append(((target - torch.softmax(self.logits(states), 1)) * beta, r[-1]))
        return terms

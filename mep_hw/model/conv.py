"""Convolutional Hopfield networks: convolution + pooling energies, read through matrix operators.

Energy (Ernoult et al. 2019, "Updates of EP match gradients of BPTT", §4 and App. E; the deep
convolutional Hopfield networks of Laborieux et al. 2021 and Scellier et al. 2023 have the same
form), with states s_1..s_L and the input clamped as ρ(s_0) := x::

    E(s) = ½ Σ_l ‖s_l‖² − Σ_{conv l} ρ(s_{l+1}) · P_l(W_l ⋆ ρ(s_l)) − Σ_{fc l} ρ(s_{l+1})ᵀ W_l ρ(s_l)
           − Σ_l b_l · ρ(s_{l+1})

W ⋆ h is a stride-1 convolution (zero padding p); P is 2×2-style pooling with window = stride
(``max`` as in Ernoult et al. 2019, or ``avg``), or none; a conv bias has one value per output
channel, broadcast over positions. The cost is the one of :class:`~mep_hw.model.LayeredHopfield`
(MSE on the last state, or a softmax cross-entropy readout by the last fc weight).

The settle's field is that of the dense network with the drive of layer l+1 (Ernoult 2019, eq. 39)::

    d_{l+1} = P_l(W_l ⋆ ρ(s_l)) + b_l  +  W_{l+1}ᵀ ⋆ P'_{l+1}ᵀ ρ(s_{l+2})

where Wᵀ⋆ is the adjoint of the convolution (``conv_transpose2d``: what a crossbar computes
when it is read from the other side) and P'ᵀ the adjoint of the pooling at the current state
(max: the value is routed back to the arg-max position of its window, zeros elsewhere;
avg: spread evenly, 1/k² each). Max pooling makes E piecewise smooth: the arg-max is fixed
within each piece, and the field above is ∂E/∂s on it.

On hardware a convolution is one crossbar tile holding the kernel matrix
K ∈ ℝ^{C_out × C_in·k·k} (the weights here are stored in that shape), read once per output
position: ``unfold`` the input into its (C_in·k·k)-long patches, read each through the tile
(``mvm``), and fold the outputs back into an image; the adjoint reads each output position's
C_out values through the transpose of the same cells (``mvm_t``) and ``fold`` sums the
overlapping patches. :class:`ConvCoupling` wraps any matrix operator (the exact
:class:`~mep_hw.model.hopfield.DenseCoupling`, or a device :class:`~mep_hw.hw.Tile`) that way;
for exact weights it calls ``conv2d``/``conv_transpose2d`` directly (the same numbers).

The architecture is declared as a string, e.g. ``conv:32:5,pool:2,conv:64:5,pool:2,fc:10``
(see :func:`parse_arch`).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mep_hw.errors import ConfigError
from mep_hw.model.activations import get_activation
from mep_hw.model.holomorphic import complex_read, softmax
from mep_hw.model.hopfield import (COSTS, DenseCoupling, HopfieldDynamics, LayeredHopfield, StoreReads, _check_finite,
                                   _kept_noise_vars, _mse_output_map, _noise_of_phase, _noise_vars)

__all__ = [
    "POOLS", "ConvLayer", "DenseLayer", "ConvGeometry", "ConvCoupling", "ConvHopfield", "ConvDynamics",
    "parse_arch", "format_arch", "build_network", "pool_forward", "pool_adjoint",
]

POOLS = ("max", "avg")
_POOL_TOKENS = {"pool": "max", "maxpool": "max", "avgpool": "avg"}


class ConvLayer(NamedTuple):
    """A convolution (stride 1, zero padding) with ``channels`` output channels and a square
    ``kernel``, followed by pooling (``pool`` in :data:`POOLS`, window = stride = ``pool_size``)
    or none (``pool`` None)."""

    channels: int
    kernel: int
    padding: int = 0
    pool: str | None = None
    pool_size: int = 1


class DenseLayer(NamedTuple):
    """A fully connected layer of ``units`` units (it flattens a convolutional state)."""

    units: int


_ARCH_HELP = (
    "comma-separated layers: conv:C:K[:P] (C channels, K×K kernel, padding P or 'same'), then "
    "optionally pool:S (max pooling S×S; also maxpool:S, avgpool:S), then fc:N layers; the last "
    "is fc:<classes>, e.g. conv:32:5,pool:2,conv:64:5,pool:2,fc:10"
)


def _int_field(tok: str, name: str, v: str, lo: int) -> int:
    if not re.fullmatch(r"\d+", v) or int(v) < lo:
        raise ConfigError(f"arch: {tok!r}: {name} must be an integer ≥ {lo}, got {v!r}; {_ARCH_HELP}")
    return int(v)


def parse_arch(spec: str | Sequence) -> tuple[ConvLayer | DenseLayer, ...]:
    """The layers of an architecture string such as ``conv:32:5,pool:2,conv:64:5,pool:2,fc:10``.

    Grammar (tokens separated by commas, fields by colons, case and spaces ignored):
    ``conv:C:K`` or ``conv:C:K:P`` (P an integer or ``same`` = (K−1)/2 for odd K);
    ``pool:S`` / ``maxpool:S`` / ``avgpool:S`` right after a conv; ``fc:N``. Convolutions come
    first, fc layers after, and the last layer is an fc layer (the output, or the readout with
    cost ``ce``). A sequence of parsed layers is accepted as is (and re-checked).
    """
    if isinstance(spec, (list, tuple)) and all(isinstance(v, (ConvLayer, DenseLayer)) for v in spec):
        return parse_arch(format_arch(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"arch={spec!r} is not an architecture string; {_ARCH_HELP}")
    out: list[ConvLayer | DenseLayer] = []
    for tok in (t.strip().lower().replace(" ", "") for t in spec.split(",")):
        if not tok:
            raise ConfigError(f"arch={spec!r} has an empty layer (two commas in a row?); {_ARCH_HELP}")
        kind, *args = tok.split(":")
        if kind == "conv":
            if len(args) not in (2, 3):
                raise ConfigError(f"arch: {tok!r} needs conv:C:K or conv:C:K:P; {_ARCH_HELP}")
            if out and isinstance(out[-1], DenseLayer):
                raise ConfigError(f"arch={spec!r}: {tok!r} comes after an fc layer; put every conv before the fc layers")
            c = _int_field(tok, "the channel count C", args[0], 1)
            k = _int_field(tok, "the kernel size K", args[1], 1)
            if len(args) == 3 and args[2] == "same":
                if k % 2 == 0:
                    raise ConfigError(f"arch: {tok!r}: padding 'same' needs an odd kernel, got K={k}; give the padding as a number")
                p = (k - 1) // 2
            else:
                p = _int_field(tok, "the padding P", args[2], 0) if len(args) == 3 else 0
            if p >= k:
                raise ConfigError(f"arch: {tok!r}: padding {p} ≥ kernel {k} adds outputs that see only zeros; use P < K")
            out.append(ConvLayer(c, k, p))
        elif kind in _POOL_TOKENS:
            if len(args) != 1:
                raise ConfigError(f"arch: {tok!r} needs one size, e.g. {kind}:2; {_ARCH_HELP}")
            if not out or not isinstance(out[-1], ConvLayer) or out[-1].pool is not None:
                raise ConfigError(
                    f"arch={spec!r}: {tok!r} must follow a conv layer directly (one pooling per conv)"
                )
            s = _int_field(tok, "the pool size S", args[0], 1)
            out[-1] = out[-1]._replace(pool=_POOL_TOKENS[kind] if s > 1 else None, pool_size=s)
        elif kind == "fc":
            if len(args) != 1:
                raise ConfigError(f"arch: {tok!r} needs one size, e.g. fc:10; {_ARCH_HELP}")
            out.append(DenseLayer(_int_field(tok, "the unit count N", args[0], 1)))
        else:
            raise ConfigError(
                f"arch: unknown layer {kind!r} in {tok!r}; valid layers: conv, {', '.join(_POOL_TOKENS)}, fc; {_ARCH_HELP}"
            )
    if not isinstance(out[-1], DenseLayer):
        raise ConfigError(f"arch={spec!r} must end with an fc layer of one unit per class (e.g. fc:10)")
    return tuple(out)


def format_arch(layers: Sequence[ConvLayer | DenseLayer]) -> str:
    """The canonical string of parsed layers (round-trips through :func:`parse_arch`)."""
    toks = []
    for L in layers:
        if isinstance(L, DenseLayer):
            toks.append(f"fc:{L.units}")
            continue
        toks.append(f"conv:{L.channels}:{L.kernel}" + (f":{L.padding}" if L.padding else ""))
        if L.pool is not None:
            toks.append(f"{'pool' if L.pool == 'max' else 'avgpool'}:{L.pool_size}")
    return ",".join(toks)


class ConvGeometry(NamedTuple):
    """Shapes of one convolutional coupling: input (c_in, h_in, w_in), convolution output
    (c_out, h_conv, w_conv), pooled state (c_out, h_out, w_out)."""

    c_in: int
    h_in: int
    w_in: int
    c_out: int
    kernel: int
    padding: int
    pool: str | None
    pool_size: int
    h_conv: int
    w_conv: int
    h_out: int
    w_out: int

    @property
    def n_in(self) -> int:
        return self.c_in * self.h_in * self.w_in

    @property
    def n_out(self) -> int:
        return self.c_out * self.h_out * self.w_out

    @property
    def positions(self) -> int:
        """Output positions of the convolution: the reads of the kernel tile per sample."""
        return self.h_conv * self.w_conv

    @property
    def fan_in(self) -> int:
        return self.c_in * self.kernel * self.kernel

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return (self.c_in, self.h_in, self.w_in)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return (self.c_out, self.h_out, self.w_out)


def _geometry(layer: ConvLayer, shape: tuple[int, int, int], where: str) -> ConvGeometry:
    c, h, w = shape
    k, p = layer.kernel, layer.padding
    hc, wc = h + 2 * p - k + 1, w + 2 * p - k + 1
    if hc < 1 or wc < 1:
        raise ConfigError(
            f"arch: {where} (conv:{layer.channels}:{k}) gets a {h}×{w} input, smaller than its {k}×{k} kernel "
            f"with padding {p}; pool less before it, pad it, or use a smaller kernel"
        )
    s = layer.pool_size if layer.pool is not None else 1
    ho, wo = hc // s, wc // s
    if ho < 1 or wo < 1:
        raise ConfigError(f"arch: {where}: pooling {s}×{s} of its {hc}×{wc} output leaves nothing; use a smaller pool")
    return ConvGeometry(c, h, w, layer.channels, k, p, layer.pool, s, hc, wc, ho, wo)


# ----------------------------------------------------------------------------- pooling
def pool_forward(z: Tensor, g: ConvGeometry) -> tuple[Tensor, Tensor | None]:
    """P(z) of a (B, C, h_conv, w_conv) convolution output and, for max pooling, the flat
    arg-max index of each window (for the adjoint). A complex z (holomorphic EP) takes the
    value at the arg-max of its real part: the continuation of the active linear piece."""
    if g.pool is None:
        return z, None
    s = g.pool_size
    if g.pool == "max":
        if not z.is_complex():
            return F.max_pool2d(z, s, return_indices=True)
        _, idx = F.max_pool2d(z.real, s, return_indices=True)
        return z.flatten(2).gather(2, idx.flatten(2)).view(idx.shape), idx
    if not z.is_complex():
        return F.avg_pool2d(z, s), None
    B, C = z.shape[:2]
    zc = z[:, :, : g.h_out * s, : g.w_out * s].reshape(B, C, g.h_out, s, g.w_out, s)
    return zc.mean(dim=(3, 5)), None


def pool_adjoint(u: Tensor, g: ConvGeometry, idx: Tensor | None) -> Tensor:
    """Pᵀu: a (B, C, h_out, w_out) tensor mapped back onto the (B, C, h_conv, w_conv) grid by the
    adjoint of the pooling (max: to the arg-max positions ``idx``; avg: u/S² on every position
    of the window; positions cut off by the floor of the pooled size get 0)."""
    if g.pool is None:
        return u
    B, C = u.shape[:2]
    if g.pool == "max":
        out = u.new_zeros(B, C, g.h_conv * g.w_conv)
        return out.scatter_(2, idx.flatten(2), u.flatten(2)).view(B, C, g.h_conv, g.w_conv)
    s = g.pool_size
    spread = (u * (1.0 / (s * s)))[:, :, :, None, :, None].expand(B, C, g.h_out, s, g.w_out, s)
    spread = spread.reshape(B, C, g.h_out * s, g.w_out * s)
    if g.h_out * s == g.h_conv and g.w_out * s == g.w_conv:
        return spread
    out = u.new_zeros(B, C, g.h_conv, g.w_conv)
    out[:, :, : g.h_out * s, : g.w_out * s] = spread
    return out


# ----------------------------------------------------------------------------- the coupling
class ConvCoupling:
    """A convolution read through a matrix operator ``op`` holding the kernel matrix
    K (C_out × C_in·k·k), with ``op.mvm(x) = x Kᵀ`` and ``op.mvm_t(u) = u K``.

    ``conv(x)`` (B, C_in, H, W) → (B, C_out, h_conv, w_conv): unfold into the B·positions patches,
    one ``op.mvm`` of all of them (each output position is one read of the tile: the tile counts
    B·positions rows), fold back. ``conv_t(u)``: the adjoint, one ``op.mvm_t`` per output
    position, overlapping patches summed by ``fold``. With an exact operator
    (:class:`~mep_hw.model.hopfield.DenseCoupling`) both are ``conv2d``/``conv_transpose2d``.
    ``mvm``/``mvm_t`` offer the same on flattened tensors: the coupling is itself a matrix
    operator (of the unrolled convolution). Complex inputs are read as two real reads.
    """

    def __init__(self, op, geometry: ConvGeometry):
        g = geometry
        self.op, self.geometry = op, g
        self.exact = isinstance(op, DenseCoupling)
        shape = tuple(getattr(op, "shape", None) or op.W.shape)
        if shape != (g.c_out, g.fan_in):
            raise ConfigError(
                f"a conv coupling {g.c_in}→{g.c_out} with {g.kernel}×{g.kernel} kernels needs a "
                f"({g.c_out}, {g.fan_in}) kernel matrix, but the operator holds {shape}"
            )
        if self.exact:
            self.kernel = op.W.view(g.c_out, g.c_in, g.kernel, g.kernel)

    def conv(self, x: Tensor, *, x_in_bound: bool = False) -> Tensor:
        if x.is_complex():
            return complex_read(lambda v: self.conv(v, x_in_bound=x_in_bound), x)
        g = self.geometry
        if self.exact:
            return F.conv2d(x, self.kernel, padding=g.padding)
        B = x.shape[0]
        rows = F.unfold(x, g.kernel, padding=g.padding).transpose(1, 2).reshape(B * g.positions, g.fan_in)
        y = self.op.mvm(rows, x_in_bound=x_in_bound)
        return y.view(B, g.positions, g.c_out).transpose(1, 2).reshape(B, g.c_out, g.h_conv, g.w_conv)

    def conv_t(self, u: Tensor, *, x_in_bound: bool = False) -> Tensor:
        if u.is_complex():
            return complex_read(lambda v: self.conv_t(v, x_in_bound=x_in_bound), u)
        g = self.geometry
        if self.exact:
            return F.conv_transpose2d(u, self.kernel, padding=g.padding)
        B = u.shape[0]
        rows = u.reshape(B, g.c_out, g.positions).transpose(1, 2).reshape(B * g.positions, g.c_out)
        y = self.op.mvm_t(rows, x_in_bound=x_in_bound)
        cols = y.view(B, g.positions, g.fan_in).transpose(1, 2)
        return F.fold(cols, (g.h_in, g.w_in), g.kernel, padding=g.padding)

    def mvm(self, x: Tensor, add: Tensor | None = None, *, x_in_bound: bool = False) -> Tensor:
        g = self.geometry
        y = self.conv(x.reshape(x.shape[0], *g.in_shape), x_in_bound=x_in_bound).flatten(1)
        return y if add is None else y + add

    def mvm_t(self, u: Tensor, add: Tensor | None = None, *, x_in_bound: bool = False) -> Tensor:
        g = self.geometry
        y = self.conv_t(u.reshape(u.shape[0], g.c_out, g.h_conv, g.w_conv), x_in_bound=x_in_bound).flatten(1)
        return y if add is None else y + add


class _Block(NamedTuple):
    """One coupling of the network: ``geometry`` for a convolution, else None (fc);
    n_in/n_out the flattened sizes on each side."""

    geometry: ConvGeometry | None
    n_in: int
    n_out: int


# ----------------------------------------------------------------------------- dynamics
class ConvDynamics:
    """The vector field of one batch of a :class:`ConvHopfield` (the settle engine's protocol:
    ``sizes``, ``box``, ``field``, ``restrict``; plus ``nudge`` and ``drives`` as in
    :class:`~mep_hw.model.hopfield.HopfieldDynamics`). ``couplings`` hold one operator per weight:
    a :class:`ConvCoupling` for a convolution, a matrix operator for an fc layer."""

    def __init__(self, *, blocks, couplings, biases, act, cost, x, input_drive, beta, target, noise_floor=0.0,
                 noise_vars=None, noise_fn=None):
        self.blocks, self.couplings, self.biases = tuple(blocks), tuple(couplings), tuple(biases)
        self.act, self.cost, self.x, self.input_drive = act, cost, x, input_drive
        self.beta, self.target = beta, target
        self.nudged = not (isinstance(beta, float) and beta == 0.0)
        self.box = act.box
        self.n_states = len(self.blocks) - (1 if cost == "ce" else 0)
        self.sizes = tuple(b.n_out for b in self.blocks[: self.n_states])
        self.noise_fn = noise_fn
        self.noise_floor, self.noise_vars = _noise_of_phase(noise_fn, beta, self.sizes, noise_floor, noise_vars)
        if self.box is not None and cost == "mse" and self.nudged:
            self._out_scale, self._out_shift, self._out_concave = _mse_output_map(beta, target)
        self._argmax: dict = {}  # block sweeps: coupling l → (ρ(s_{l−1}) it was read at, its max-pool arg-max)

    def _with(self, same_phase: bool = False, **kw) -> "ConvDynamics":
        """A copy with ``kw`` replaced; a new phase (``same_phase`` False) has its noise recomputed."""
        args = dict(blocks=self.blocks, couplings=self.couplings, biases=self.biases, act=self.act, cost=self.cost,
                    x=self.x, input_drive=self.input_drive, beta=self.beta, target=self.target,
                    noise_floor=self.noise_floor, noise_vars=_kept_noise_vars(self, same_phase), noise_fn=self.noise_fn)
        args.update(kw)
        return ConvDynamics(**args)

    def restrict(self, index: Tensor) -> "ConvDynamics":
        return self._with(
            same_phase=True,
            x=self.x[index],
            input_drive=None if self.input_drive is None else self.input_drive[index],
            beta=self.beta[index] if isinstance(self.beta, Tensor) else self.beta,
            target=None if self.target is None else self.target[index],
        )

    def nudge(self, beta: float | Tensor, target: Tensor) -> "ConvDynamics":
        """The same batch at nudging strength ``beta``: a new phase (the input array is read
        again unless it is exact); a (k·batch, 1) β repeats the batch k times."""
        x, drive = self.x, self.input_drive
        if isinstance(beta, Tensor) and beta.shape[0] != x.shape[0]:
            k = beta.shape[0] // x.shape[0]
            x = x.repeat(k, 1)
            drive = None if drive is None else drive.repeat(k, 1)
        if not getattr(self.couplings[0], "exact", False):
            drive = None
        dyn = self._with(x=x, input_drive=drive, beta=beta, target=target)
        if dyn.input_drive is None:
            dyn.input_drive = dyn.drive0()
        return dyn

    # -- reads
    def _up(self, l: int, h: Tensor, inb: bool) -> tuple[Tensor, Tensor | None]:
        """Bottom-up drive of state l from ρ of the layer below (flat), with its bias, flat;
        and the max-pool arg-max (or None)."""
        blk, op, b = self.blocks[l], self.couplings[l], self.biases[l]
        g = blk.geometry
        if g is None:
            return op.mvm(h, b, x_in_bound=inb), None
        z = op.conv(h.reshape(h.shape[0], *g.in_shape), x_in_bound=inb)
        p, idx = pool_forward(z, g)
        return p.add_(b.view(1, -1, 1, 1)).flatten(1), idx

    def _down(self, l: int, h: Tensor, idx: Tensor | None, add: Tensor, inb: bool) -> Tensor:
        """add + the adjoint of coupling l applied to ρ of the layer above (flat)."""
        blk, op = self.blocks[l], self.couplings[l]
        g = blk.geometry
        if g is None:
            return op.mvm_t(h, add, x_in_bound=inb)
        u = pool_adjoint(h.reshape(h.shape[0], *g.out_shape), g, idx)
        return add + op.conv_t(u, x_in_bound=inb).flatten(1)

    def drive0(self) -> Tensor:
        """P(W₀ ⋆ x) + b₀, read once for the phase."""
        if self.input_drive is not None:
            return self.input_drive
        return self._up(0, self.x, False)[0]

    def drives(self, rho: Sequence[Tensor]) -> list[Tensor]:
        """d_l = P(W_{l−1}⋆ρ(s_{l−1})) + b + W_lᵀ⋆P'ᵀρ(s_{l+1}) − β∂C/∂ρ(s_l) (the CE readout's
        nudge acts through ρ(s_L); the MSE nudge acts on s_L itself and is not included)."""
        n = self.n_states
        inb = self.box is not None
        ups, idxs = [self.drive0()], [None]
        for l in range(1, n):
            d, idx = self._up(l, rho[l - 1], inb)
            ups.append(d)
            idxs.append(idx)
        out = []
        for l in range(n):
            d = ups[l]
            if l + 1 < n:
                d = self._down(l + 1, rho[l + 1], idxs[l + 1], d, inb)
            out.append(d)
        if self.cost == "ce" and self.nudged:
            out[-1] = self._readout_nudge(rho[-1], out[-1], inb)
        return out

    def _readout_nudge(self, h: Tensor, d: Tensor, inb: bool) -> Tensor:
        """d − β W_outᵀ(softmax(W_out h + b_out) − y): the CE readout's nudge on the last state."""
        ro = self.couplings[-1]
        err = (softmax(ro.mvm(h, self.biases[-1], x_in_bound=inb), dim=1) - self.target) * self.beta
        return ro.mvm_t(err.neg_(), d)

    _box_target = HopfieldDynamics._box_target  # the MSE output's relaxation target (same attributes)

    def _max_pooled(self, l: int) -> bool:
        """Whether coupling l is a max-pooled convolution (its adjoint routes through an arg-max)."""
        g = self.blocks[l].geometry
        return g is not None and g.pool == "max"

    # -- block sweeps (red-black block coordinate descent, :mod:`mep_hw.settle.solvers`)
    def _block_targets(self, s: Sequence[Tensor], parity: int):
        """(l, target before the clip) for every layer l ≡ parity (mod 2), from the per-layer
        states ``s`` (flat, in the box, where ρ(s) = s). A max-pooled coupling above layer l
        routes its feedback through the arg-max at the current s_l (one more forward read)."""
        if self.box is None:
            raise ConfigError(
                f"the block solver needs an activation with a box (hard_sigmoid); activation {self.act.name!r} "
                "has none: use an ODE solver (euler, heun, rk4, bosh3, dopri5)"
            )
        n = self.n_states
        for l in range(parity, n, 2):
            if l == 0:
                d = self.drive0().clone()
            else:
                d, idx = self._up(l, s[l - 1], True)
                if idx is not None and idx.device.type == "cpu":  # valid for s_{l−1}'s next update if it is unchanged
                    self._argmax[l] = (s[l - 1].clone(), idx)
            if l + 1 < n:
                idx = None
                if self._max_pooled(l + 1):
                    src, idx = self._argmax.get(l + 1, (None, None))
                    # the check reads a bool on the host: on an accelerator (no syncs in the settle
                    # loop) the arg-max is read again instead
                    if src is None or src.device.type != "cpu" or src.shape != s[l].shape or not torch.equal(src, s[l]):
                        idx = self._up(l + 1, s[l], True)[1]  # one more forward read
                d = self._down(l + 1, s[l + 1], idx, d, True)
            if l == n - 1 and self.nudged:
                d = self._readout_nudge(s[-1], d, True) if self.cost == "ce" else self._box_target(d, s[-1])
            yield l, d

    def block_self_coupled(self, parity: int) -> bool:
        """Whether a layer l ≡ parity (mod 2) has a target that depends on s_l itself: below a
        max-pooled convolution (its arg-max), or the last layer when nudged (the CE readout;
        the MSE output at 1 + β ≤ 0)."""
        n = self.n_states
        for l in range(parity, n, 2):
            if l + 1 < n and self._max_pooled(l + 1):
                return True
            if l == n - 1 and self.nudged and (self.cost == "ce" or getattr(self, "_out_concave", None) is not None):
                return True
        return False

    def block_field(self, s: Sequence[Tensor], parity: int, out: Sequence[Tensor]) -> None:
        """Write f_l(s) = clip(d_l) − s_l (as :meth:`field`) of every layer l ≡ parity (mod 2)
        into ``out[l]``.

        As for the dense network (:meth:`mep_hw.model.hopfield.HopfieldDynamics.block_field`),
        layers of one parity do not interact and F is ½s² − s·d per unit in s_l, so s_l + f_l is
        the exact minimiser of F over the box given the other layers — with average or no
        pooling. Max pooling above s_l adds −ρ(s_{l+1})·max(W⋆s_l) to F, concave in s_l
        (ρ ≥ 0): routing the feedback through the current arg-max replaces it by its tangent,
        which lies above it, so the step minimises a majoriser of F and does not increase F
        (majorise–minimise). The fixed points are those of the ODE (the field is the same). The
        arg-max comes from the forward read that the other parity's half-sweep made of s_l (kept
        while s_l is unchanged; else s_l is read once more): on the CPU a sweep then reads every
        array forward and transposed once, as an Euler step does. On an accelerator the check
        (a bool read on the host) would synchronise the settle loop, so the arg-max is read again:
        one more forward read of each max-pooled convolution per sweep."""
        lo, hi = self.box or (None, None)
        for l, d in self._block_targets(s, parity):
            torch.clamp(d, lo, hi, out=out[l]).sub_(s[l])

    def block_update(self, s: Sequence[Tensor], parity: int) -> None:
        """Set every layer l ≡ parity (mod 2) of ``s``, in place, to its block target clip(d_l)."""
        lo, hi = self.box or (None, None)
        for l, d in self._block_targets(s, parity):
            torch.clamp(d, lo, hi, out=s[l])

    def grad_energy(self, states: Sequence[Tensor]) -> list[Tensor]:
        """∂F/∂s_l = s_l − ρ'(s_l) ⊙ d_l + β ∂C/∂s_l, per layer (flat), for any states."""
        d = self.drives([self.act.fn(t) for t in states])
        g = [torch.addcmul(t, self.act.deriv(t), dl, value=-1.0) for t, dl in zip(states, d)]
        if self.cost == "mse" and self.nudged:
            g[-1] = g[-1] + (states[-1] - self.target) * self.beta
        return g

    def field(self, s: Tensor) -> Tensor:
        """ds/dt on the packed state: −∂F/∂s, or with a box the projected-gradient flow
        clip(d) − s (see :meth:`mep_hw.model.hopfield.HopfieldDynamics.field`)."""
        views = torch.split_with_sizes(s, self.sizes, dim=1)
        if self.box is None:
            return torch.cat(self.grad_energy(views), dim=1).neg_()
        d = self.drives(views)
        if self.cost == "mse" and self.nudged:
            d[-1] = self._box_target(d[-1], views[-1])
        f = torch.cat(d, dim=1) if len(d) > 1 else d[0].clone()
        return f.clamp_(self.box[0], self.box[1]).sub_(s)


# ----------------------------------------------------------------------------- the network
class ConvHopfield(StoreReads, nn.Module):
    """A convolutional Hopfield network for EP (see the module docstring for E).

    ``arch`` is an architecture string or parsed layers (:func:`parse_arch`); ``input_shape``
    is (C, H, W) (or (n,) when the arch has no conv). Inputs arrive flattened, (batch, C·H·W),
    as the datasets give them. A conv weight is stored as its kernel matrix
    (C_out, C_in·k·k) — the shape of the crossbar tile that holds it — and an fc weight as in
    ``nn.Linear``. States are flattened per sample (a conv state in (C, H, W) order) and packed
    as (batch, Σ n_l) for the settle engine. With cost ``ce`` the last fc layer is the readout.
    The interface is that of :class:`~mep_hw.model.LayeredHopfield`, whose network this is
    when every layer is fc.
    """

    def __init__(
        self,
        arch,
        input_shape: Sequence[int],
        *,
        activation: str = "hard_sigmoid",
        cost: str = "mse",
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        specs = parse_arch(arch)
        if cost not in COSTS:
            raise ConfigError(f"unknown cost {cost!r}; valid costs: {', '.join(COSTS)}")
        if cost == "ce" and len(specs) < 2:
            raise ConfigError(
                f"cost='ce' uses the last fc layer as a readout and needs a layer before it, but arch="
                f"{format_arch(specs)!r}; add a layer or use cost='mse'"
            )
        shape = tuple(int(v) for v in input_shape)
        if any(isinstance(L, ConvLayer) for L in specs) and len(shape) != 3:
            raise ConfigError(
                f"arch {format_arch(specs)!r} has convolutions and needs image inputs (C, H, W), but the input "
                f"shape is {shape}; use a dataset with images (mnist, fashion-mnist, cifar10, digits) or fc layers only"
            )
        if any(n < 1 for n in shape) or not shape:
            raise ConfigError(f"input_shape={shape} must be positive sizes")
        self.arch = format_arch(specs)
        self.specs = specs
        self.input_shape = shape
        self.act = get_activation(activation)
        self.cost = cost
        blocks, cur = [], shape
        for i, L in enumerate(specs):
            n_in = math.prod(cur)
            if isinstance(L, ConvLayer):
                g = _geometry(L, cur, f"layer {i + 1}")
                blocks.append(_Block(g, n_in, g.n_out))
                cur = g.out_shape
            else:
                blocks.append(_Block(None, n_in, L.units))
                cur = (L.units,)
        self.blocks = tuple(blocks)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for blk in self.blocks:
            g = blk.geometry
            rows, fan_in = (g.c_out, g.fan_in) if g is not None else (blk.n_out, blk.n_in)
            # U(±1/√fan_in): the default of nn.Linear and nn.Conv2d (fan_in = C_in·k·k)
            bound = 1.0 / math.sqrt(fan_in)
            w = torch.empty(rows, fan_in, dtype=dtype, device=device)
            w.uniform_(-bound, bound, generator=generator)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(rows, dtype=dtype, device=device)))
        # layer sizes as LayeredHopfield has them: input, the states, and (ce) the classes
        self.layers = (math.prod(shape), *self.state_sizes, *((specs[-1].units,) if cost == "ce" else ()))

    # ----------------------------------------------------------------- structure
    @property
    def n_states(self) -> int:
        return len(self.blocks) - (1 if self.cost == "ce" else 0)

    @property
    def state_sizes(self) -> tuple[int, ...]:
        return tuple(b.n_out for b in self.blocks[: self.n_states])

    @property
    def n_classes(self) -> int:
        return self.blocks[-1].n_out

    def param_list(self) -> list[nn.Parameter]:
        """Parameters in the order of :meth:`ep_contrast`: W_0, b_0, W_1, b_1, …"""
        out = []
        for w, b in zip(self.weights, self.biases):
            out += [w, b]
        return out

    def kernel(self, l: int) -> Tensor:
        """The weight of coupling l as a conv kernel (C_out, C_in, k, k) (fc: the matrix)."""
        g = self.blocks[l].geometry
        w = self.weights[l]
        return w if g is None else w.view(g.c_out, g.c_in, g.kernel, g.kernel)

    def positions(self) -> tuple[int, ...]:
        """Reads of each weight's tile per sample and evaluation: output positions (fc: 1)."""
        return tuple(1 if b.geometry is None else b.geometry.positions for b in self.blocks)

    # ----------------------------------------------------------------- inputs
    def check_batch(self, x: Tensor, y: Tensor | None = None) -> None:
        n_in = self.layers[0]
        if x.ndim != 2 or x.shape[1] != n_in:
            raise ConfigError(
                f"input x has shape {tuple(x.shape)} but the network expects (batch, {n_in}) = flattened "
                f"{'×'.join(map(str, self.input_shape))} inputs; flatten images and check --arch"
            )
        _check_finite("input x", x)
        if y is not None:
            if y.shape != (x.shape[0], self.n_classes):
                raise ConfigError(
                    f"target has shape {tuple(y.shape)} but expected (batch={x.shape[0]}, {self.n_classes}); "
                    "pass one-hot targets (see mep_hw.model.one_hot)"
                )
            _check_finite("target", y)

    def couplings(self, ops: Sequence) -> list:
        """The operators the settle reads: ``ops`` (one matrix operator per weight, e.g. device
        tiles), a convolution's wrapped in a :class:`ConvCoupling`."""
        return [op if b.geometry is None else ConvCoupling(op, b.geometry) for op, b in zip(ops, self.blocks)]

    def dynamics(
        self, x: Tensor, *, beta: float | Tensor = 0.0, target: Tensor | None = None, check: bool = True,
        free_states=None, complex_reads: bool = False,
    ) -> ConvDynamics:
        """The vector field for batch ``x`` (as :meth:`LayeredHopfield.dynamics`), reading each
        weight matrix (a conv's kernel matrix) through :attr:`store`, the input drive
        P(W₀⋆x) + b₀ once per phase."""
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
        if self.store.holds_biases:
            raise ConfigError("analog biases (in-array updates) are not supported for convolutional networks yet; use --update host")
        b = [v.detach() for v in self.biases]
        ops = self.store_ops(complex_reads)
        dyn = ConvDynamics(blocks=self.blocks, couplings=self.couplings(ops), biases=b, act=self.act, cost=self.cost,
                           x=x, input_drive=None, beta=beta, target=target, noise_fn=self.noise_fn())
        dyn.input_drive = dyn.drive0()
        return dyn

    def noise_vars(self, beta: float = 0.0) -> tuple[float, ...]:
        """Per state layer, the variance of the noise of one field evaluation read through the
        store (as :meth:`LayeredHopfield.noise_vars`: the held input drive is not among them). A
        forward read reaches a state through its pooling: an average pool of size p divides its
        noise variance by p², a max pool is counted as one read (an upper bound: the max of p²
        noisy outputs varies less than one of them). A transposed convolution sums the transpose
        reads of the patches that cover each input: P·k²/(h_in·w_in) of them on average (P output
        positions of k² inputs each; at most k²: fewer at the borders), and its inputs are the
        pooling adjoint of states of rms 0.5: a max pool routes each to one of p² positions (rms
        0.5/p), an average pool spreads it over all p², divided by p² (rms 0.5/p²)."""

        def reads(l):
            g = self.blocks[l].geometry
            if g is None:
                return 1.0, 1, 0.5
            k2 = g.kernel * g.kernel
            cover = min(float(k2), g.positions * k2 / (g.h_in * g.w_in))
            p = g.pool_size if g.pool is not None else 1
            if g.pool == "avg":
                return 1.0 / (p * p), cover, 0.5 / (p * p)
            return 1.0, cover, 0.5 / p

        return _noise_vars(self.store, self.n_states, self.cost, beta, reads)

    def forward_init(self, dyn: ConvDynamics) -> list[Tensor]:
        """A feed-forward pass s_l = ρ(P(W_{l−1}⋆ρ(s_{l−1})) + b): the warm start of the free
        phase, read through the same operators."""
        act = self.act
        inb = act.box is not None
        s = [act.fn(dyn.drive0())]
        for l in range(1, self.n_states):
            s.append(act.fn(dyn._up(l, s[-1], inb)[0]))
        return s

    def zero_init(self, x: Tensor) -> list[Tensor]:
        return [x.new_zeros(x.shape[0], n) for n in self.state_sizes]

    def rho(self, states: Sequence[Tensor]) -> list[Tensor]:
        """ρ of settled states (identity for a box activation: settled states lie in its box)."""
        if self.act.box is not None:
            return list(states)
        return [self.act.fn(s) for s in states]

    # ----------------------------------------------------------------- energies (autograd-able)
    def _coupling_energy(self, l: int, below: Tensor, above: Tensor) -> Tensor:
        """ρ(s_{l+1}) · (P(W_l⋆ρ(s_l)) + b_l) per sample, from torch's own conv and pooling."""
        blk = self.blocks[l]
        g = blk.geometry
        if g is None:
            return ((below @ self.weights[l].T) * above).sum(1) + above @ self.biases[l]
        z = F.conv2d(below.reshape(below.shape[0], *g.in_shape), self.kernel(l), padding=g.padding)
        if g.pool == "max":
            z = F.max_pool2d(z, g.pool_size)
        elif g.pool == "avg":
            z = F.avg_pool2d(z, g.pool_size)
        z = z + self.biases[l].view(1, -1, 1, 1)
        return (z.flatten(1) * above).sum(1)

    def energy(self, x: Tensor, states: Sequence[Tensor]) -> Tensor:
        """E(s) per sample, shape (batch,)."""
        rho = [x] + [self.act.fn(s) for s in states]
        e = sum(0.5 * (s * s).sum(1) for s in states)
        for l in range(self.n_states):
            e = e - self._coupling_energy(l, rho[l], rho[l + 1])
        return e

    # ----------------------------------------------------------------- EP parameter gradients
    def _routed(self, l: int, below: Tensor, above: Tensor) -> Tensor:
        """P'ᵀρ(s_{l+1}) on the convolution's output grid (B, C_out, h_conv, w_conv): for max
        pooling routed to the arg-max of W_l⋆ρ(s_l) at this state."""
        g = self.blocks[l].geometry
        B = above.shape[0]
        idx = None
        if g.pool == "max":
            kern = self.kernel(l).detach()
            img = below.reshape(B, *g.in_shape)
            z = complex_read(lambda v: F.conv2d(v, kern, padding=g.padding), img) if img.is_complex() and not kern.is_complex() \
                else F.conv2d(img, kern, padding=g.padding)
            idx = pool_forward(z, g)[1]
        return pool_adjoint(above.reshape(B, *g.out_shape), g, idx)

    @staticmethod
    def _weight_grad(g: ConvGeometry, below: Tensor, u: Tensor) -> Tensor:
        """Σ_batch Σ_positions u ⊗ patch(ρ(s_l)): the (C_out, C_in·k·k) outer products the kernel
        tile would receive, one per output position."""
        B = below.shape[0]
        cols = F.unfold(below.reshape(B, *g.in_shape), g.kernel, padding=g.padding)  # (B, C_in·k·k, positions)
        if cols.dtype != u.dtype:
            dt = torch.promote_types(cols.dtype, u.dtype)
            cols, u = cols.to(dt), u.to(dt)
        return torch.einsum("bop,bkp->ok", u.reshape(B, g.c_out, g.positions), cols)

    @torch.no_grad()
    def ep_contrast(self, x: Tensor, sa, beta_a, sb, beta_b, target: Tensor) -> list[Tensor]:
        """[∂F/∂θ(s^a, β_a) − ∂F/∂θ(s^b, β_b)] / (β_a − β_b), batch-averaged, as local terms: for
        a conv weight −Σ_positions [P'ᵀρ(s^a_{l+1}) ⊗ patch(ρ(s^a_l)) − (same at b)] (each
        state with its own arg-max), for its bias −Σ_positions [ρ(s^a_{l+1}) − ρ(s^b_{l+1})];
        fc layers and the readout as in :meth:`LayeredHopfield.ep_contrast`. Works for complex
        states and β (holomorphic EP). Returned in the order of :meth:`param_list`."""
        k = 1.0 / ((beta_a - beta_b) * x.shape[0])
        ra = [x] + self.rho(sa)
        rb = [x] + self.rho(sb)
        grads = []
        for l in range(self.n_states):
            g = self.blocks[l].geometry
            if g is None:
                if l == 0:
                    gw = _mm((rb[1] - ra[1]).T, x)
                else:
                    gw = _mm(rb[l + 1].T, rb[l]) - _mm(ra[l + 1].T, ra[l])
                gb = (rb[l + 1] - ra[l + 1]).sum(0)
            else:
                ua, ub = self._routed(l, ra[l], ra[l + 1]), self._routed(l, rb[l], rb[l + 1])
                if l == 0:  # the input is clamped: one product instead of two
                    gw = self._weight_grad(g, x, ub - ua)
                else:
                    gw = self._weight_grad(g, rb[l], ub) - self._weight_grad(g, ra[l], ua)
                gb = (rb[l + 1] - ra[l + 1]).reshape(x.shape[0], g.c_out, -1).sum((0, 2))
            grads += [gw * k, gb * k]
        if self.cost == "ce":  # ∂(βC)/∂θ for the readout: β (p − y) ρ(s_L)ᵀ
            ea = (softmax(self.logits(sa), 1) - target) * beta_a
            eb = (softmax(self.logits(sb), 1) - target) * beta_b
            gw = _mm(ea.T, ra[-1]) - _mm(eb.T, rb[-1])
            grads += [gw * k, (ea - eb).sum(0) * k]
        return grads


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b, promoting a real operand when the other is complex."""
    if a.dtype != b.dtype:
        dt = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dt), b.to(dt)
    return a @ b


# ----------------------------------------------------------------------------- construction
def build_network(
    *,
    arch: str | None,
    layers: Sequence[int] | None,
    input_shape: Sequence[int],
    n_classes: int,
    activation: str = "hard_sigmoid",
    cost: str = "mse",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    hidden: int = 500,
    dataset: str | None = None,
) -> LayeredHopfield | ConvHopfield:
    """The network a training run uses, from its configuration and its dataset's shape.

    With ``arch`` (an architecture string): a :class:`ConvHopfield` whose last fc layer must
    have ``n_classes`` units; ``layers``, if given (a resumed run stores them), must equal the
    network's layer sizes. Without: a :class:`LayeredHopfield` of ``layers``, by default
    (inputs, ``hidden``, classes). Weights are drawn from a generator seeded with ``seed``.
    ``dataset`` (its name) only words the errors.
    """
    which = f"dataset {dataset!r}" if dataset else "the dataset"
    shape = tuple(int(v) for v in input_shape)
    n_in = math.prod(shape)
    gen = torch.Generator().manual_seed(int(seed))
    if arch is None:
        layers = tuple(layers) if layers else (n_in, hidden, n_classes)
        if layers[0] != n_in or layers[-1] != n_classes:
            raise ConfigError(
                f"layers={','.join(map(str, layers))} do not fit {which}, which has {n_in} inputs and "
                f"{n_classes} classes; use --layers {n_in},…,{n_classes}"
            )
        model = LayeredHopfield(layers, activation=activation, cost=cost, generator=gen, dtype=dtype)
        return model.to(device) if device is not None else model
    specs = parse_arch(arch)
    if specs[-1].units != n_classes:
        raise ConfigError(
            f"arch={format_arch(specs)!r} ends with fc:{specs[-1].units} but {which} has {n_classes} classes; "
            f"end the arch with fc:{n_classes}"
        )
    model = ConvHopfield(specs, shape, activation=activation, cost=cost, generator=gen, dtype=dtype)
    if layers is not None and tuple(layers) != model.layers:
        raise ConfigError(
            f"layers={','.join(map(str, layers))} contradict arch={model.arch!r}, whose layer sizes are "
            f"{','.join(map(str, model.layers))}; give --arch alone"
        )
    return model.to(device) if device is not None else model

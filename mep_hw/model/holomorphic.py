"""Complex states for holomorphic EP (Laborieux & Zenke, NeurIPS 2022).

Holomorphic EP settles the network at complex nudging strengths β = |β|e^{iθ}. The states are
then complex, and the dynamics must be the holomorphic continuation of the real one: the field
may use only operations that are complex-differentiable (products, sums, exp), never |·|,
conjugates, clips or comparisons of complex numbers.

* Weights stay real. A real matrix read with a complex input is two real reads,
  W(a + ib) = Wa + iWb (:func:`complex_read`); a device tile wrapped in :class:`ComplexReads`
  therefore counts (and, if noisy, samples noise for) both reads, as a crossbar would.
* The softmax of the cross-entropy readout, exp(z_k)/Σ_j exp(z_j), is holomorphic;
  :func:`softmax` shifts by the real part's maximum (a constant factor that cancels), which
  keeps it finite and works for complex logits (``torch.softmax`` does not).
* Activations: only those listed in :data:`HOLOMORPHIC_ACTIVATIONS`. The sigmoid
  ρ(s) = σ(4s − 2) = 1/(1 + e^{−(4s−2)}) is the ``my_sigmoid`` Laborieux & Zenke train with (poles
  at 4s − 2 = iπ(2m+1), far from the real axis for small |β|). The hard sigmoid (a clip onto
  [0, 1]) is not holomorphic: its states are kept in the box by projection, which has no
  complex continuation.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from mep_hw.errors import ConfigError

__all__ = ["HOLOMORPHIC_ACTIVATIONS", "ComplexReads", "check_holomorphic", "complex_dtype", "complex_read", "softmax"]

HOLOMORPHIC_ACTIVATIONS = ("sigmoid",)

_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """complex64 for float32, complex128 for float64 (a complex dtype maps to itself)."""
    if dtype.is_complex:
        return dtype
    try:
        return _COMPLEX[dtype]
    except KeyError:
        raise ConfigError(f"complex states need float32 or float64 weights, got {dtype}") from None


def complex_read(read: Callable[[Tensor], Tensor], x: Tensor, add: Tensor | None = None) -> Tensor:
    """add + read(x) for a complex ``x`` through a real linear ``read``: the real and imaginary
    parts are read as one stacked batch (two real reads per sample), W(a+ib) = Wa + iWb."""
    B = x.shape[0]
    y = read(torch.cat([x.real, x.imag]))
    out = torch.complex(y[:B], y[B:])
    return out if add is None else out.add_(add)


def softmax(z: Tensor, dim: int = 1) -> Tensor:
    """exp(z)/Σ exp(z) along ``dim``, for real or complex ``z`` (holomorphic in z)."""
    if not z.is_complex():
        return torch.softmax(z, dim=dim)
    e = (z - z.real.amax(dim=dim, keepdim=True)).exp()
    return e / e.sum(dim=dim, keepdim=True)


class ComplexReads:
    """A real matrix operator (``mvm``/``mvm_t``, e.g. a device tile) that also accepts complex
    inputs, read as two real reads (:func:`complex_read`); real inputs pass straight through."""

    def __init__(self, op):
        self.op = op

    def __getattr__(self, name):  # shape, totals, … of the wrapped operator
        return getattr(self.op, name)

    def mvm(self, x: Tensor, add: Tensor | None = None, *, x_in_bound: bool = False) -> Tensor:
        if not x.is_complex():
            if add is not None and add.is_complex():
                return self.op.mvm(x, x_in_bound=x_in_bound).add(add)
            return self.op.mvm(x, add, x_in_bound=x_in_bound)
        return complex_read(lambda v: self.op.mvm(v, x_in_bound=x_in_bound), x, add)

    def mvm_t(self, u: Tensor, add: Tensor | None = None, *, x_in_bound: bool = False) -> Tensor:
        if not u.is_complex():
            if add is not None and add.is_complex():
                return self.op.mvm_t(u, x_in_bound=x_in_bound).add(add)
            return self.op.mvm_t(u, add, x_in_bound=x_in_bound)
        return complex_read(lambda v: self.op.mvm_t(v, x_in_bound=x_in_bound), u, add)


def check_holomorphic(model) -> None:
    """Raise ConfigError unless ``model`` can settle at a complex β: an energy with an
    activation of :data:`HOLOMORPHIC_ACTIVATIONS` (costs mse and ce both qualify)."""
    act = getattr(model, "act", None)
    if act is None:
        raise ConfigError(
            f"holomorphic EP needs a Hopfield energy (LayeredHopfield or ConvHopfield), not "
            f"{type(model).__name__}; use the symmetric estimator"
        )
    if act.name not in HOLOMORPHIC_ACTIVATIONS:
        raise ConfigError(
            f"holomorphic EP settles at complex β and needs a holomorphic activation, but activation="
            f"{act.name!r} is not one (the hard sigmoid is a clip, which has no complex continuation); "
            f"use activation={' or '.join(repr(a) for a in HOLOMORPHIC_ACTIVATIONS)}, or the symmetric estimator"
        )

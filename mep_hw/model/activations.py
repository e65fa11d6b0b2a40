"""Activation functions ρ of the layered Hopfield energy, in a registry keyed by name.

Each activation carries its derivative (written analytically, so the settle loop needs no
autograd) and, when it has one, the *box* on which it is the identity. For a box activation the
states are kept inside the box by projection, as in Scellier & Bengio (2017), who clip the states
of the hard-sigmoid network to [0, 1] after every step; inside the box ρ(s) = s and ρ'(s) = 1.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from mep_hw.errors import ConfigError

__all__ = ["Activation", "ACTIVATIONS", "get_activation"]


class Activation(NamedTuple):
    """ρ, its derivative ρ', and the box [lo, hi] on which ρ is the identity (or None)."""

    name: str
    fn: Callable[[Tensor], Tensor]
    deriv: Callable[[Tensor], Tensor]
    box: tuple[float, float] | None
    lipschitz: float


def _hard_sigmoid(s: Tensor) -> Tensor:
    return s.clamp(0.0, 1.0)


def _hard_sigmoid_deriv(s: Tensor) -> Tensor:
    # Matches autograd of clamp: gradient 1 on the closed interval [0, 1].
    return ((s >= 0.0) & (s <= 1.0)).to(s.dtype)


def _sigmoid(s: Tensor) -> Tensor:
    # ρ(s) = σ(4s − 2): slope 1 at s = 1/2 like the hard sigmoid, so ρ is 1-Lipschitz.
    return torch.sigmoid(4.0 * s - 2.0)


def _sigmoid_deriv(s: Tensor) -> Tensor:
    p = torch.sigmoid(4.0 * s - 2.0)
    return 4.0 * p * (1.0 - p)


ACTIVATIONS: dict[str, Activation] = {
    "hard_sigmoid": Activation("hard_sigmoid", _hard_sigmoid, _hard_sigmoid_deriv, (0.0, 1.0), 1.0),
    "sigmoid": Activation("sigmoid", _sigmoid, _sigmoid_deriv, None, 1.0),
}


def get_activation(name: str) -> Activation:
    """Return the activation registered under ``name``; unknown names list the valid ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(
            f"unknown activation {name!r}; valid activations: {', '.join(sorted(ACTIVATIONS))}"
        ) from None

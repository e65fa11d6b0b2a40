"""Energies: the layered Hopfield network (and, with the optimizer API, feed-forward energies)."""

from mep_hw.model.activations import ACTIVATIONS, Activation, get_activation
from mep_hw.model.hopfield import COSTS, HopfieldDynamics, LayeredHopfield
from mep_hw.model.sequential import LOSS_TYPES, SUPPORTED_MODULES, FeedforwardEnergy, SequentialDynamics


def one_hot(labels, n_classes: int, dtype=None):
    """One-hot targets of shape (batch, n_classes) from integer labels."""
    import torch

    return torch.nn.functional.one_hot(labels.long(), n_classes).to(dtype or torch.get_default_dtype())


__all__ = ["ACTIVATIONS", "Activation", "COSTS", "FeedforwardEnergy", "HopfieldDynamics", "LOSS_TYPES", "LayeredHopfield", "SUPPORTED_MODULES", "SequentialDynamics", "get_activation", "one_hot"]

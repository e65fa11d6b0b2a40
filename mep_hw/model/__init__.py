"""Energies: the layered Hopfield network (and, with the optimizer API, feed-forward energies)."""

from mep_hw.model.activations import ACTIVATIONS, Activation, get_activation
from mep_hw.model.hopfield import COSTS, DenseCoupling, HopfieldDynamics, LayeredHopfield
from mep_hw.model.conv import (
    POOLS, ConvCoupling, ConvDynamics, ConvHopfield, ConvLayer, DenseLayer, build_network, format_arch, parse_arch,
)
from mep_hw.model.holomorphic import HOLOMORPHIC_ACTIVATIONS, ComplexReads, check_holomorphic
from mep_hw.model.sequential import LOSS_TYPES, SUPPORTED_MODULES, FeedforwardEnergy, SequentialDynamics


def one_hot(labels, n_classes: int, dtype=None):
    """One-hot targets of shape (batch, n_classes) from integer labels."""
    import torch

    return torch.nn.functional.one_hot(labels.long(), n_classes).to(dtype or torch.get_default_dtype())


__all__ = ["ACTIVATIONS", "Activation", "COSTS", "ComplexReads", "ConvCoupling", "ConvDynamics", "ConvHopfield",
           "ConvLayer", "DenseCoupling", "DenseLayer", "FeedforwardEnergy", "HOLOMORPHIC_ACTIVATIONS", "POOLS", "build_network", "check_holomorphic",
           "format_arch", "parse_arch", "HopfieldDynamics", "LOSS_TYPES", "LayeredHopfield", "SUPPORTED_MODULES", "SequentialDynamics", "get_activation", "one_hot"]

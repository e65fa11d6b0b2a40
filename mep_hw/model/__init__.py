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

    # scatter rather than F.one_hot, which reads min and max of the labels back to the host (two
    # synchronisations per batch on CUDA); an out-of-range label still fails in the scatter
    labels = labels.long()
    out = torch.zeros((*labels.shape, int(n_classes)), dtype=dtype or torch.get_default_dtype(), device=labels.device)
    return out.scatter_(-1, labels.unsqueeze(-1), 1.0)


__all__ = ["ACTIVATIONS", "Activation", "COSTS", "ComplexReads", "ConvCoupling", "ConvDynamics", "ConvHopfield",
           "ConvLayer", "DenseCoupling", "DenseLayer", "FeedforwardEnergy", "HOLOMORPHIC_ACTIVATIONS", "POOLS", "build_network", "check_holomorphic",
           "format_arch", "parse_arch", "HopfieldDynamics", "LOSS_TYPES", "LayeredHopfield", "SUPPORTED_MODULES", "SequentialDynamics", "get_activation", "one_hot"]

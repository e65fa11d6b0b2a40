"""The MEP optimizer API: SMEPOptimizer, SDMEPOptimizer, presets and strategy classes."""

from mep_hw.optimizers.host import HOST_OPTIMIZERS, host_optimizer
from mep_hw.optimizers.presets import PRESETS, local_ep, muon_backprop, natural_ep, sdmep, smep
from mep_hw.optimizers.smep import SDMEPOptimizer, SMEPOptimizer
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

__all__ = [
    "AdamUpdate", "DionUpdate", "EPGradient", "ErrorFeedback", "HOST_OPTIMIZERS", "LocalEPGradient", "MomentumUpdate",
    "MuonUpdate", "NaturalGradient", "PRESETS", "SDMEPOptimizer", "SMEPOptimizer", "SpectralConstraint",
    "local_ep", "muon_backprop", "natural_ep", "host_optimizer", "sdmep", "settle_safe_gamma", "smep",
]

"""mep_hw: Equilibrium Propagation training on modeled neuromorphic and analog hardware.

The names a user needs are re-exported here; everything else is private to its module. See
README.md and docs/. (``settle`` and ``train`` here are the functions, not the subpackages of
the same name.)
"""

from __future__ import annotations

from mep_hw.errors import ConfigError, DataError, DeviceError, DivergedError, MepHwError, SettleError, StorageError, TraceError
from mep_hw.model import LayeredHopfield, one_hot
from mep_hw.settle import SOLVERS, SettleConfig, SettleResult, SettleStatus, settle
from mep_hw.ep import EPConfig, assign_grads, ep_gradients
from mep_hw.io import load_dataset
from mep_hw.train import TrainConfig, train
from mep_hw.optimizers import (
    DionUpdate, EPGradient, ErrorFeedback, LocalEPGradient, MuonUpdate, NaturalGradient,
    SDMEPOptimizer, SMEPOptimizer, SpectralConstraint, local_ep, muon_backprop, natural_ep, sdmep, smep,
)
from mep_hw.model import FeedforwardEnergy

__all__ = [
    "ConfigError", "DataError", "DeviceError", "DivergedError", "MepHwError", "SettleError", "StorageError", "TraceError",
    "LayeredHopfield", "one_hot",
    "SOLVERS", "SettleConfig", "SettleResult", "SettleStatus", "settle",
    "EPConfig", "assign_grads", "ep_gradients",
    "load_dataset",
    "TrainConfig", "train",
    "SMEPOptimizer", "SDMEPOptimizer", "smep", "sdmep", "local_ep", "natural_ep", "muon_backprop",
    "EPGradient", "LocalEPGradient", "NaturalGradient", "MuonUpdate", "DionUpdate", "SpectralConstraint",
    "ErrorFeedback", "FeedforwardEnergy",
]

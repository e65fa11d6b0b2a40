"""Training: the run configuration and the EP training loop."""

from mep_hw.train.config import TrainConfig, option_names, parse_layers
from mep_hw.train.guards import STATUSES, SettleWarning
from mep_hw.train.loop import EpochStats, TrainResult, evaluate, train

__all__ = ["EpochStats", "STATUSES", "SettleWarning", "TrainConfig", "TrainResult", "evaluate", "option_names", "parse_layers", "train"]

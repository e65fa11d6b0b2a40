"""Training: the run configuration, the generic loop (fit, observers), update regimes and EP training."""

from mep_hw.train.config import TrainConfig, option_names, parse_layers
from mep_hw.train.fit import Observer, fit
from mep_hw.train.loop import EpochStats, EPTrainer, TrainResult, evaluate, train

__all__ = ["EPTrainer", "EpochStats", "Observer", "TrainConfig", "TrainResult", "evaluate", "fit", "option_names", "parse_layers", "train"]

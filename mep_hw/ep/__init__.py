"""EP estimators: one-sided and symmetric local Hebbian contrasts."""

from mep_hw.ep.estimators import ESTIMATORS, INITS, EPConfig, EPResult, assign_grads, ep_gradients, free_phase

__all__ = ["ESTIMATORS", "INITS", "EPConfig", "EPResult", "assign_grads", "ep_gradients", "free_phase"]

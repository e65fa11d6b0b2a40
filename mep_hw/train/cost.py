"""Cost accounting of a hardware run: operation counts per epoch → ``metrics.json["cost"]``.

Training counts (summed over the run) are the tile operations of the training passes (the free
and nudged settles and nothing else), the pulses and refreshes of the writes, the host FLOPs of
the EP estimate and the optimizer step, and the settle time and steps of every phase.
Inference counts are those of the last evaluation pass (the test set, free phase only). See
:mod:`mep_hw.hw.cost` for the energy and latency model.
"""

from __future__ import annotations

from mep_hw.hw.cost import CostCounts, cost_summary
from mep_hw.settle import get_solver

__all__ = ["CostAccumulator"]

_KEYS = ("samples", "macs", "dac", "adc", "pulses", "refreshes", "host_flops", "settle_time_tau", "settle_steps")


class CostAccumulator:
    def __init__(self, phases: int):
        self.phases = phases
        self.train = dict.fromkeys(_KEYS, 0)
        self.test = dict.fromkeys(_KEYS, 0)

    def add_epoch(self, before: dict, after_train: dict, after_eval: dict, *, n: int, host_flops: int,
                  settle: tuple[float, float], test: tuple[int, float, float]) -> None:
        d = {k: after_train[k] - before[k] for k in after_train}
        t = self.train
        t["samples"] += n
        for k in ("macs", "dac", "adc", "refreshes"):
            t[k] += d[k]
        t["pulses"] += d["pulses_up"] + d["pulses_down"]
        t["host_flops"] += host_flops
        t["settle_time_tau"] += settle[0]
        t["settle_steps"] += settle[1]
        n_test, time_mean, steps_mean = test
        e = {k: after_eval[k] - after_train[k] for k in after_eval}
        self.test = {"samples": n_test, "macs": e["macs"], "dac": e["dac"], "adc": e["adc"], "pulses": 0, "refreshes": 0,
                     "host_flops": 0, "settle_time_tau": time_mean * n_test, "settle_steps": steps_mean * n_test}

    def summary(self, card, cfg, model) -> dict:
        shapes = [tuple(w.shape) for w in model.weights]
        # the input array is read once per phase (the input is clamped: its drive is held); one field
        # evaluation reads every other array forward and transposed
        macs_per_eval = 2 * sum(o * i for o, i in shapes[1:])
        try:
            stages = get_solver(cfg.solver).stages
        except Exception:  # a backend (brian2), not a tableau: one evaluation per step
            stages = 1
        kw = dict(kind=card.kind, clock_hz=getattr(card.device, "clock_hz", None), macs_per_eval=macs_per_eval, stages=stages,
                  init_reads=len(shapes) if cfg.init == "forward" else 0,
                  init_macs=sum(o * i for o, i in shapes) if cfg.init == "forward" else 0)
        train = cost_summary(card.cost, CostCounts(**self.train, phases=self.phases), **kw)
        infer = cost_summary(card.cost, CostCounts(**self.test, phases=1), **kw)
        return {"train": train, "inference": infer, "macs_per_field_eval": macs_per_eval,
                "constants": card.to_dict()["cost"], "missing": sorted(set(train["missing"]) | set(infer["missing"]))}

    def state_dict(self) -> dict:
        return {"train": dict(self.train), "test": dict(self.test)}

    def load_state_dict(self, d: dict | None) -> None:
        if d:
            self.train = {**self.train, **d["train"]}
            self.test = {**self.test, **d["test"]}

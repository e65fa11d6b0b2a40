"""Cost accounting of a hardware run: operation counts per epoch → ``metrics.json["cost"]``.

Training counts (summed over the run) are the tile operations of the training passes (the free
and nudged settles and nothing else), the pulses and refreshes of the writes, the host FLOPs of
the EP estimate and the optimizer step, the neuron circuits' operations, and the settle time and
steps of every phase. The neurons' state updates are counted from the settle steps
(:func:`settle_neuron_ops`); the learning rule's own neuron operations (signed phases'
subtractions, backprop's loss gradient and ρ' masks) come from the trainer.
Inference counts are those of the last evaluation pass (the test set, free phase only). See
:mod:`mep_hw.hw.cost` for the energy and latency model.
"""

from __future__ import annotations

from mep_hw.hw.base import Device
from mep_hw.hw.cost import NEURON_OPS_PER_UPDATE, CostCounts, cost_summary
from mep_hw.settle import evals_per_step

__all__ = ["CostAccumulator", "field_eval_macs", "settle_neuron_ops", "learning_rule_neuron_ops"]


def field_eval_macs(model) -> tuple[int, int]:
    """(MACs of one field evaluation, MACs of one read of every array) per sample.

    The input array is read once per phase (the input is clamped: its drive is held); one field
    evaluation reads every other array forward and transposed, and so does one sweep of the block
    solver (each parity's arrays, in two half-sweeps). A convolution's kernel matrix
    (C_out, C_in·k²) is read at each of its output positions (``model.positions()``)."""
    reads = [p * w.shape[0] * w.shape[1] for w, p in zip(model.weights, model.positions())]
    return 2 * sum(reads[1:]), sum(reads)


def settle_neuron_ops(model, *, samples: float, settle_steps: float, stages: int, init_units: int) -> float:
    """The neurons' operations of the settles: ``NEURON_OPS_PER_UPDATE`` per unit and field
    evaluation (``settle_steps`` × ``stages`` evaluations; an Euler step's count, an upper figure
    for a block sweep's clip), and one (the activation's clip) per unit of ``init_units`` and sample
    for the bottom-up pass (EP's free-phase initialisation, backprop's forward pass)."""
    return settle_steps * stages * sum(model.state_sizes) * NEURON_OPS_PER_UPDATE + samples * init_units


def learning_rule_neuron_ops(cfg, model) -> int:
    """Per sample, the learning rule's own neuron operations: backprop's loss gradient (2 per
    output) and δ ⊙ ρ'(a) (2 per hidden unit); with signed phases in the array, each first-layer
    neuron's ρ(s⁺) − ρ(s⁻) (one per unit); else none."""
    if cfg.method == "backprop":
        sizes = [w.shape[0] for w in model.weights]
        return 2 * sizes[-1] + 2 * sum(sizes[:-1])
    if cfg.update != "host" and cfg.pulse_phases == "signed":
        return model.state_sizes[0]
    return 0


_KEYS = ("samples", "macs", "dac", "adc", "pulses", "refreshes", "host_flops", "settle_time_tau", "settle_steps",
         "read_J", "write_J", "static_W", "neuron_ops")


class CostAccumulator:
    def __init__(self, phases: int):
        self.phases = phases
        self.train = dict.fromkeys(_KEYS, 0)
        self.test = dict.fromkeys(_KEYS, 0)

    def add_epoch(self, before: dict, after_train: dict, after_eval: dict, *, n: int, host_flops: int,
                  settle: tuple[float, float], test: tuple[int, float, float], neuron_ops: int = 0) -> None:
        """One epoch's counts; ``neuron_ops``: the learning rule's neuron operations (the settles'
        are derived from their steps in :meth:`summary`)."""
        d = {k: after_train[k] - before[k] for k in after_train}
        t = self.train
        t["samples"] += n
        for k in ("macs", "dac", "adc", "refreshes", "read_J", "write_J"):
            t[k] += d.get(k, 0)
        t["static_W"] = after_train.get("static_W", 0.0)  # holding power now (not a count)
        t["pulses"] += d["pulses_up"] + d["pulses_down"]
        t["host_flops"] += host_flops
        t["neuron_ops"] += neuron_ops
        t["settle_time_tau"] += settle[0]
        t["settle_steps"] += settle[1]
        n_test, time_mean, steps_mean = test
        e = {k: after_eval[k] - after_train[k] for k in after_eval}
        self.test = {"samples": n_test, "macs": e["macs"], "dac": e["dac"], "adc": e["adc"], "pulses": 0, "refreshes": 0,
                     "host_flops": 0, "settle_time_tau": time_mean * n_test, "settle_steps": steps_mean * n_test,
                     "read_J": e.get("read_J", 0.0), "write_J": 0.0, "static_W": after_eval.get("static_W", 0.0),
                     "neuron_ops": 0}

    def summary(self, card, cfg, model) -> dict:
        macs_per_eval, init_macs = field_eval_macs(model)
        backprop = cfg.method == "backprop"
        init = cfg.init == "forward" or backprop  # backprop's forward pass, whatever --init says
        # the units whose activation the bottom-up pass computes (backprop's output is linear)
        init_units = (sum(w.shape[0] for w in model.weights[:-1]) if backprop else sum(model.state_sizes)) if init else 0
        stages = evals_per_step(cfg.settle_solver)  # tableau stages; 1 per sweep; 1 per backend (Euler) step
        dev = card.device
        kw = dict(kind=card.kind, clock_hz=getattr(dev, "clock_hz", None), macs_per_eval=macs_per_eval, stages=stages,
                  read_energy=type(dev).read_energy_lines is not Device.read_energy_lines,
                  write_energy=bool(dev.models_write_energy),
                  init_reads=len(model.weights) if init else 0, init_macs=init_macs if init else 0)
        train, test = (dict(c, neuron_ops=c["neuron_ops"] + settle_neuron_ops(
            model, samples=c["samples"], settle_steps=c["settle_steps"], stages=stages, init_units=init_units))
            for c in (self.train, self.test))
        train = cost_summary(card.cost, CostCounts(**train, phases=self.phases), **kw)
        infer = cost_summary(card.cost, CostCounts(**test, phases=1), **kw)
        return {"train": train, "inference": infer, "macs_per_field_eval": macs_per_eval,
                "constants": card.to_dict()["cost"], "missing": sorted(set(train["missing"]) | set(infer["missing"]))}

    def state_dict(self) -> dict:
        return {"train": dict(self.train), "test": dict(self.test)}

    def load_state_dict(self, d: dict | None, *, learning_rule_ops: int = 0) -> None:
        """``learning_rule_ops``: per sample, the learning rule's neuron operations
        (:func:`learning_rule_neuron_ops`), which a checkpoint written before the neurons were
        counted holds in its host FLOPs: they are moved, so a resumed run is accounted as one."""
        if d:
            legacy = "neuron_ops" not in d["train"]
            self.train = {**dict.fromkeys(_KEYS, 0), **d["train"]}
            self.test = {**dict.fromkeys(_KEYS, 0), **d["test"]}
            if legacy:
                moved = learning_rule_ops * self.train["samples"]
                self.train["host_flops"] -= moved
                self.train["neuron_ops"] += moved

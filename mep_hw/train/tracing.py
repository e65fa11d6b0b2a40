"""Tracing a training run into ``RUN_DIR/trace.h5`` (``--trace-every``).

``--trace-every N`` records an interval every N optimizer steps; ``--trace-every Nepoch`` every
N epochs (at the epoch's end). An interval holds, per weight matrix, the logical weights the
network uses (for a device run: what the device holds, noise-free) and the device's physical
state (conductances in µS, MZI phases in rad, fixed-point integers), the cumulative pulse
counts, and — averaged over the steps since the previous interval — settle steps and final
residuals of the free and nudged phases, the training loss and accuracy; and the mean energy
E(s⁰) of the free fixed points of the batch of the step the interval is recorded at (under the
held weights: computed only then). Step 0 (the initial weights) is always recorded.
Every finished epoch appends its metrics to ``/epochs``.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

import numpy as np
import torch

from mep_hw.errors import ConfigError
from mep_hw.io.trace import TraceWriter
from mep_hw.settle import SettleStatus

__all__ = ["TraceEvery", "parse_trace_every", "StepTotals", "batch_sums", "open_trace", "interval_values", "epoch_units"]

TRACE_FILE = "trace.h5"


class TraceEvery(NamedTuple):
    n: int
    unit: str  # "steps" or "epochs"

    def due_step(self, step: int) -> bool:
        return self.unit == "steps" and step % self.n == 0

    def due_epoch(self, epoch: int) -> bool:
        return self.unit == "epochs" and epoch % self.n == 0


def parse_trace_every(value) -> TraceEvery | None:
    """``200`` / ``"200"`` / ``"200steps"`` → every 200 steps; ``"1epoch"`` / ``"2epochs"`` → epochs."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(steps?|epochs?)?\s*", str(value))
    if isinstance(value, bool) or not m or int(m.group(1)) < 1:
        raise ConfigError(
            f"trace_every={value!r}: expected a positive number of steps or epochs, e.g. --trace-every 200 "
            "(every 200 optimizer steps) or --trace-every 1epoch"
        )
    unit = "epochs" if (m.group(2) or "").startswith("epoch") else "steps"
    return TraceEvery(int(m.group(1)), unit)


def batch_sums(res, y: torch.Tensor) -> dict[str, float]:
    """The sums over one training batch that epoch statistics and trace intervals are made of
    (settle steps, times, residuals and step-limit hits per phase, loss, correct predictions)."""
    out = {
        "n": float(y.shape[0]),
        "free_steps": float(res.free.steps.sum()), "free_time": float(res.free.time.sum()),
        "free_residual": float(res.free.residual.sum()),
        "free_limit": float((res.free.status == SettleStatus.STEP_LIMIT).sum()),
        "n_nudged": 0.0, "nudged_steps": 0.0, "nudged_time": 0.0, "nudged_residual": 0.0, "nudged_limit": 0.0,
        "loss": float(res.loss.sum()), "correct": float((res.logits.argmax(1) == y).sum()),
    }
    for r in res.nudged:
        out["n_nudged"] += r.steps.numel()
        out["nudged_steps"] += float(r.steps.sum())
        out["nudged_time"] += float(r.time.sum())
        out["nudged_residual"] += float(r.residual.sum())
        out["nudged_limit"] += float((r.status == SettleStatus.STEP_LIMIT).sum())
    return out


class StepTotals:
    """Running sums of :func:`batch_sums` over training steps: an epoch, or a trace interval."""

    KEYS = ("n", "free_steps", "free_time", "free_residual", "free_limit", "n_nudged", "nudged_steps",
            "nudged_time", "nudged_residual", "nudged_limit", "loss", "correct")

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums = dict.fromkeys(self.KEYS, 0.0)

    def add(self, sums: dict[str, float]) -> None:
        for k, v in sums.items():
            self.sums[k] += v

    def mean(self, key: str, per: str = "n") -> float:
        """sums[key] / sums[per] (NaN over no samples)."""
        d = self.sums[per]
        return self.sums[key] / d if d else float("nan")

    def means(self) -> dict[str, tuple[float, str]]:
        """The per-interval records of a trace."""
        return {
            "settle/free_steps_mean": (self.mean("free_steps"), "steps"),
            "settle/free_residual_mean": (self.mean("free_residual"), "1/tau"),
            "settle/nudged_steps_mean": (self.mean("nudged_steps", "n_nudged"), "steps"),
            "settle/nudged_residual_mean": (self.mean("nudged_residual", "n_nudged"), "1/tau"),
            "metrics/train_loss": (self.mean("loss"), "1"),
            "metrics/train_accuracy": (self.mean("correct"), "1"),
        }


def epoch_units(field: str) -> str:
    """Units of an EpochStats field in the trace's /epochs group."""
    if field.endswith("seconds"):
        return "s"
    if field.endswith("steps_mean"):
        return "steps"
    if field.startswith("pulses") or field == "refreshes":
        return "pulses"
    return "1"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy()


@torch.no_grad()
def interval_values(model, acc: StepTotals, energy: float = float("nan")) -> dict[str, tuple[np.ndarray | float, str]]:
    """One trace interval: ``acc``'s means, the free-state ``energy``, and per weight matrix what
    the model's weight store holds (weights, biases, the device's physical state, cumulative
    operation counts)."""
    out: dict = dict(acc.means())
    out["energy/free_mean"] = (energy, "1")
    store = model.store
    for k, (w, b) in enumerate(zip(model.weights, model.biases)):
        out[f"layers/W{k}/weight"] = (_np(store.held(k)), "1")
        out[f"layers/W{k}/bias"] = (_np(b), "1")
    if store.card is not None:
        for k, info in enumerate(store.layer_info()):
            for name, (value, units) in store.physical(k).items():
                out[f"layers/W{k}/{name}"] = (_np(value), units)
            for name in ("pulses_up", "pulses_down", "refreshes"):
                out[f"layers/W{k}/{name}"] = (np.int64(info[name]), "pulses")
            for name, units in (("macs", "MAC"), ("dac", "conversions"), ("adc", "conversions")):  # cumulative, mep_hw.hw.cost
                out[f"layers/W{k}/{name}"] = (np.int64(info[name]), units)
            out[f"layers/W{k}/w_scale"] = (np.float64(info["w_scale"]), "1")
    return out


def open_trace(run_dir, cfg, card, *, resume_epoch: int | None, steps_per_epoch: int) -> TraceWriter:
    """Create ``trace.h5`` or, on resume, reopen it trimmed to what the checkpoint covers."""
    attrs = {
        "config_toml": _toml(cfg.to_dict()),
        "device_json": json.dumps(card.to_dict() if card is not None else None),
        "trace_every": str(cfg.trace_every),
        "mep_hw_version": _version(),
    }
    keep = None if resume_epoch is None else resume_epoch * steps_per_epoch
    return TraceWriter.open(run_dir / TRACE_FILE, attrs, keep_step=keep, keep_epoch=resume_epoch or 0)


def _toml(d: dict) -> str:
    import tomli_w

    return tomli_w.dumps(d)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mep_hw")
    except PackageNotFoundError:
        return "unknown"

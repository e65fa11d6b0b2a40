"""Tracing a training run into ``RUN_DIR/trace.h5`` (``--trace-every``).

``--trace-every N`` records an interval every N optimizer steps; ``--trace-every Nepoch`` every
N epochs (at the epoch's end). An interval holds, per weight matrix, the logical weights the
network uses (for a device run: what the device holds, noise-free) and the device's physical
state (conductances in µS, MZI phases in rad, fixed-point integers), the cumulative pulse
counts, and — averaged over the steps since the previous interval — settle steps and final
residuals of the free and nudged phases, the energy E(s⁰) of the free fixed point (under the held
weights), the training loss and accuracy. Step 0 (the initial weights) is always recorded.
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

__all__ = ["TraceEvery", "parse_trace_every", "IntervalAccumulator", "open_trace", "interval_values", "epoch_units"]

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


class IntervalAccumulator:
    """Running sums of the per-step quantities between two intervals."""

    KEYS = ("free_steps", "free_residual", "nudged_steps", "nudged_residual", "energy", "loss", "correct")

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.n = self.n_nudged = 0

    def add(self, res, energy: torch.Tensor, y: torch.Tensor) -> None:
        s = self.sums
        s["free_steps"] += float(res.free.steps.sum())
        s["free_residual"] += float(res.free.residual.sum())
        for r in res.nudged:
            s["nudged_steps"] += float(r.steps.sum())
            s["nudged_residual"] += float(r.residual.sum())
            self.n_nudged += r.steps.numel()
        s["energy"] += float(energy.sum())
        s["loss"] += float(res.loss.sum())
        s["correct"] += float((res.logits.argmax(1) == y).sum())
        self.n += y.shape[0]

    def means(self) -> dict[str, tuple[float, str]]:
        n, nn, s = max(self.n, 1), max(self.n_nudged, 1), self.sums
        nan = float("nan")
        return {
            "settle/free_steps_mean": (s["free_steps"] / n if self.n else nan, "steps"),
            "settle/free_residual_mean": (s["free_residual"] / n if self.n else nan, "1/tau"),
            "settle/nudged_steps_mean": (s["nudged_steps"] / nn if self.n_nudged else nan, "steps"),
            "settle/nudged_residual_mean": (s["nudged_residual"] / nn if self.n_nudged else nan, "1/tau"),
            "energy/free_mean": (s["energy"] / n if self.n else nan, "1"),
            "metrics/train_loss": (s["loss"] / n if self.n else nan, "1"),
            "metrics/train_accuracy": (s["correct"] / n if self.n else nan, "1"),
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
def interval_values(model, hw, acc: IntervalAccumulator) -> dict[str, tuple[np.ndarray | float, str]]:
    out: dict = dict(acc.means())
    for k, (w, b) in enumerate(zip(model.weights, model.biases)):
        out[f"layers/W{k}/weight"] = (_np(w), "1")
        out[f"layers/W{k}/bias"] = (_np(b), "1")
    if hw is not None:
        for k, t in enumerate(hw.tiles):
            for name, (value, units) in t.device.physical(t.state).items():
                out[f"layers/W{k}/{name}"] = (_np(value), units)
            for name in ("pulses_up", "pulses_down", "refreshes"):
                out[f"layers/W{k}/{name}"] = (np.int64(t.totals[name]), "pulses")
            for name, units in (("macs", "MAC"), ("dac", "conversions"), ("adc", "conversions")):  # cumulative, mep_hw.hw.cost
                out[f"layers/W{k}/{name}"] = (np.int64(t.totals[name]), units)
            out[f"layers/W{k}/w_scale"] = (np.float64(t.w_scale), "1")
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

"""Tracing a training run into ``RUN_DIR/trace.h5`` (``--trace-every``).

``--trace-every N`` records an interval every N optimizer steps; ``--trace-every Nepoch`` every
N epochs (at the epoch's end). An interval holds, per weight matrix, the logical weights the
network uses (for a device run: what the device holds, noise-free) and the device's physical
state (conductances in µS, MZI phases in rad, fixed-point integers), the cumulative pulse
counts, and — averaged over the steps since the previous interval — settle steps and final
residuals of the free and nudged phases, the training loss and accuracy; and the mean energy
E(s⁰) of the free fixed points of the batch of the step the interval is recorded at (under the
held weights: computed only then). Step 0 (the initial weights) and the run's last step are
always recorded. Every finished epoch appends its metrics to ``/epochs``.

The running sums of the interval in progress are part of the checkpoint (the trace observer's
state, :meth:`StepTotals.state_dict`), so a run resumed from the end of an epoch in the middle
of an interval records the same averages as a run that never stopped.
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

__all__ = ["SUM_KEYS", "BatchSums", "TraceEvery", "parse_trace_every", "StepTotals", "batch_sums", "open_trace", "interval_values", "epoch_units"]

TRACE_FILE = "trace.h5"


class TraceEvery(NamedTuple):
    n: int
    unit: str  # "steps" or "epochs"

    def due_step(self, step: int) -> bool:
        return self.unit == "steps" and step % self.n == 0

    def due_epoch(self, epoch: int) -> bool:
        return self.unit == "epochs" and epoch % self.n == 0

    def due(self, step: int, epoch: int, *, epoch_end: bool, run_end: bool) -> bool:
        """Whether an interval is recorded after optimizer step ``step`` (in epoch ``epoch``):
        every n-th step, at the end of every n-th epoch, and always at the run's last step."""
        return run_end or self.due_step(step) or (epoch_end and self.due_epoch(epoch))


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


SUM_KEYS = ("n", "free_steps", "free_time", "free_residual", "free_limit", "free_nonfinite", "n_nudged",
            "nudged_steps", "nudged_time", "nudged_residual", "nudged_limit", "nudged_nonfinite", "loss", "correct")


class _BatchParts(NamedTuple):
    """The per-sample results of one step that its sums are made of."""

    free: object  # SettleResult of the free phase
    nudged: tuple  # SettleResults of the nudged phases
    loss: torch.Tensor
    logits: torch.Tensor
    y: torch.Tensor


class BatchSums:
    """The sums over one training batch in the order of :data:`SUM_KEYS`, as one float64 tensor
    ``values`` on the batch's device: nothing is read on the host until a value is asked for.

    Made by :func:`batch_sums` from a step's results, it keeps the per-sample tensors the sums
    are made of and reduces them only when ``values`` is asked for; a :class:`StepTotals` reduces
    the batches it collects together, a few operations per many steps instead of some thirty
    per step."""

    __slots__ = ("_values", "_parts")

    def __init__(self, values: torch.Tensor | None = None, *, parts: _BatchParts | None = None):
        if (values is None) == (parts is None):
            raise ValueError("BatchSums takes values or parts")
        self._values, self._parts = values, parts

    @property
    def values(self) -> torch.Tensor:
        if self._values is None:
            self._values = _reduce([self])
        return self._values

    def __getitem__(self, key: str) -> float:  # a host read: for occasional use (accumulate the sums instead)
        return float(self.values[SUM_KEYS.index(key)])

    def as_dict(self) -> dict[str, float]:
        return dict(zip(SUM_KEYS, self.values.tolist()))


def _phase_sums(rs, dtype) -> torch.Tensor:
    """(steps, time, residual, step-limit count, non-finite count) summed over the samples of
    the settles ``rs`` (zeros for none)."""
    if not rs:
        return torch.zeros(5, dtype=dtype)
    steps = torch.cat([r.steps for r in rs]).sum().to(dtype).reshape(1)
    tr = torch.stack([torch.cat([r.time for r in rs]), torch.cat([r.residual for r in rs])]).to(dtype).sum(1)
    status = torch.cat([r.status for r in rs]).to(torch.int64)
    counts = torch.bincount(status, minlength=len(SettleStatus))[SettleStatus.STEP_LIMIT:SettleStatus.NONFINITE + 1].to(dtype)
    return torch.cat([steps, tr, counts])


def _reduce(batches: list["BatchSums"]) -> torch.Tensor:
    """The summed :data:`SUM_KEYS` vector of ``batches`` (float64, on their device)."""
    dt = torch.float64
    parts = [b._parts for b in batches]
    free = [p.free for p in parts]
    nudged = [r for p in parts for r in p.nudged]
    n = sum(p.y.shape[0] for p in parts)
    n_nudged = sum(r.steps.numel() for r in nudged)
    f = _phase_sums(free, dt).to(free[0].steps.device)
    g = _phase_sums(nudged, dt).to(f.device)
    loss = torch.cat([p.loss.reshape(-1) for p in parts]).sum().to(dt)
    correct = torch.cat([p.logits.argmax(1) == p.y for p in parts]).sum().to(dt)
    head = f.new_full((1,), float(n))  # filled on the device: no host-to-device copy
    nn = f.new_full((1,), float(n_nudged))
    return torch.cat([head, f, nn, g, torch.stack([loss, correct])])


def batch_sums(res, y: torch.Tensor) -> BatchSums:
    """The sums over one training batch that epoch statistics and trace intervals are made of
    (settle steps, times, residuals, step-limit hits and non-finite samples per phase, loss,
    correct predictions), computed on the device without reading anything on the host: read
    them once per epoch or trace interval (:class:`StepTotals`). Nothing is computed here: the
    batch's per-sample results are kept until they are reduced."""
    return BatchSums(parts=_BatchParts(res.free, tuple(res.nudged), res.loss, res.logits, y))


class StepTotals:
    """Running sums of :func:`batch_sums` over training steps: an epoch, or a trace interval.
    The batches are collected and reduced together on the device every :attr:`FOLD_EVERY` steps
    (no operation per step); ``sums`` reduces what is pending and reads the totals on the host
    (one synchronisation)."""

    KEYS = SUM_KEYS

    def __init__(self):
        self.reset()

    # pending batches are reduced together once this many have been collected (bounds the memory
    # they hold: per batch a few per-sample vectors)
    FOLD_EVERY = 64

    def reset(self):
        self._acc: torch.Tensor | None = None
        self._pending: list[BatchSums] = []
        self._host = dict.fromkeys(self.KEYS, 0.0)

    def _fold(self) -> None:
        if not self._pending:
            return
        lazy = [b for b in self._pending if b._values is None]
        total = _reduce(lazy) if lazy else None
        for b in self._pending:
            if b._values is not None:
                total = b._values.clone() if total is None else total.add_(b._values)
        self._pending = []
        self._acc = total if self._acc is None else self._acc.add_(total)

    def state_dict(self) -> dict[str, float]:
        """The running sums as plain floats (for the checkpoint; one host read)."""
        return self.sums

    def load_state_dict(self, state: dict[str, float] | None) -> None:
        """Continue from :meth:`state_dict` (None, from an older checkpoint: start from zero)."""
        self.reset()
        for k, v in (state or {}).items():
            if k in self._host:
                self._host[k] = float(v)

    def add(self, sums: BatchSums | dict[str, float]) -> None:
        """Add one batch's sums (a :class:`BatchSums` stays on the device; a dict of floats is
        added on the host)."""
        if isinstance(sums, BatchSums):
            self._pending.append(sums)
            if len(self._pending) >= self.FOLD_EVERY:
                self._fold()
        else:
            for k, v in sums.items():
                self._host[k] += v

    @property
    def sums(self) -> dict[str, float]:
        """The totals as host floats (reads the device sums once)."""
        out = dict(self._host)
        self._fold()
        if self._acc is not None:
            for k, v in zip(SUM_KEYS, self._acc.tolist()):
                out[k] += v
        return out

    def nonfinite(self) -> int:
        """Samples that ended non-finite (any phase) in these steps: one host read."""
        s = self.sums
        return int(s["free_nonfinite"] + s["nudged_nonfinite"])

    def mean(self, key: str, per: str = "n", sums: dict[str, float] | None = None) -> float:
        """sums[key] / sums[per] (NaN over no samples)."""
        sums = self.sums if sums is None else sums
        d = sums[per]
        return sums[key] / d if d else float("nan")

    def means(self) -> dict[str, tuple[float, str]]:
        """The per-interval records of a trace."""
        s = self.sums
        return {
            "settle/free_steps_mean": (self.mean("free_steps", sums=s), "steps"),
            "settle/free_residual_mean": (self.mean("free_residual", sums=s), "1/tau"),
            "settle/nudged_steps_mean": (self.mean("nudged_steps", "n_nudged", s), "steps"),
            "settle/nudged_residual_mean": (self.mean("nudged_residual", "n_nudged", s), "1/tau"),
            "metrics/train_loss": (self.mean("loss", sums=s), "1"),
            "metrics/train_accuracy": (self.mean("correct", sums=s), "1"),
        }


def epoch_units(field: str) -> str:
    """Units of an EpochStats field in the trace's /epochs group."""
    if field.endswith("seconds"):
        return "s"
    if field.endswith("time_mean"):
        return "tau"  # settle time in units of the network's time constant (× the card's tau_s: seconds)
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

"""What a training run records, as observers of :func:`mep_hw.train.fit.fit`: the checkpoint,
``metrics.json``, the HDF5 trace and the cost accounting of a hardware run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from mep_hw.io.runs import save_checkpoint, write_json
from mep_hw.train.cost import CostAccumulator
from mep_hw.train.fit import Observer
from mep_hw.train.tracing import StepTotals, TraceEvery, epoch_units, interval_values

__all__ = ["StepOut", "CheckpointObserver", "MetricsObserver", "TraceObserver", "CostObserver", "ProgressObserver"]

CHECKPOINT_FORMAT = 2  # 2: weight store + host optimizer through the write path (issue 12)


class StepOut(NamedTuple):
    """What one EP training step hands its observers."""

    x: Tensor  # the batch
    result: object  # the EPResult
    sums: dict  # batch_sums: settle statistics, loss, correct predictions
    host_flops: int  # the host's arithmetic in this step


class CheckpointObserver(Observer):
    """Rewrites ``checkpoint.pt`` atomically after every epoch with everything a resume needs,
    ``state()`` giving the parts (model, store, regime, cost…)."""

    def __init__(self, path: Path, state: Callable[[], dict]):
        self.path, self.state = path, state

    def on_epoch(self, epoch, stats, history) -> None:
        save_checkpoint(self.path, {"format": CHECKPOINT_FORMAT, "epoch": epoch,
                                    "history": [h._asdict() for h in history], **self.state()})


class MetricsObserver(Observer):
    """Rewrites ``metrics.json`` after every epoch (status ``running`` until the last) and when
    the run stops, with the status and the error."""

    def __init__(self, path: Path, static: Callable[[], dict], history: list, epochs: int):
        self.path, self.static, self.history, self.epochs = path, static, history, epochs

    def write(self, status: str, error: str | None = None) -> None:
        h = self.history
        last = h[-1] if h else None
        write_json(self.path, {
            "status": status,
            "error": error,
            "test_accuracy": last.test_accuracy if last else None,
            "train_loss": last.train_loss if last else None,
            "epochs_completed": len(h),
            "history": [s._asdict() for s in h],
            **self.static(),
        })

    def on_epoch(self, epoch, stats, history) -> None:
        self.history = history
        self.write("running" if epoch < self.epochs else "completed")

    def on_stop(self, status, error) -> None:
        self.write(status, error)


class TraceObserver(Observer):
    """Writes an interval of ``trace.h5`` every ``every`` steps or epochs (see
    :mod:`mep_hw.train.tracing`) and appends each epoch's metrics to ``/epochs``. Settle
    statistics, loss and accuracy are averaged over the steps since the previous interval; what
    needs extra work (the free-state energy, the weights and the device state) is computed only
    when an interval is due."""

    def __init__(self, tracer, every: TraceEvery, model, steps_per_epoch: int, extra: Callable[[], dict] | None = None):
        self.tracer, self.every, self.model = tracer, every, model
        self.steps_per_epoch = steps_per_epoch
        self.acc = StepTotals()
        self.extra = extra  # more datasets per interval (e.g. tiki-taka's fast arrays and buffers)

    def _values(self, energy: float = float("nan")) -> dict:
        values = interval_values(self.model, self.acc, energy)
        if self.extra is not None:
            values.update({k: (v.detach().cpu().numpy(), u) for k, (v, u) in self.extra().items()})
        return values

    def record_initial(self) -> None:
        if self.tracer.count() == 0:
            self.tracer.interval(0, 0, self._values())

    def on_step(self, step, epoch, batch, out: StepOut) -> None:
        self.acc.add(out.sums)
        last = batch == self.steps_per_epoch - 1
        if self.every.due_step(step) or (last and self.every.due_epoch(epoch)):
            energy = float("nan")
            free = out.result.free.states
            if free:  # an EP step (a backprop step has no free state)
                with torch.no_grad():
                    energy = float(self.model.energy(out.x, free).mean())
            self.tracer.interval(step, epoch, self._values(energy))
            self.acc.reset()

    def on_epoch(self, epoch, stats, history) -> None:
        self.tracer.epoch(epoch, {k: (v, epoch_units(k)) for k, v in stats._asdict().items() if k != "epoch"})

    def on_stop(self, status, error) -> None:
        self.tracer.close()


class CostObserver(Observer):
    """Counts what the hardware does per epoch (store operations of the training pass and of the
    evaluation, the host's FLOPs, settle time and steps) into a
    :class:`~mep_hw.train.cost.CostAccumulator`."""

    def __init__(self, acc: CostAccumulator, counts: Callable, n_train: int, n_test: int):
        self.acc, self.counts, self.n_train, self.n_test = acc, counts, n_train, n_test

    def begin_epoch(self, epoch) -> None:
        self.c0 = self.counts()
        self.flops = 0
        self.settle = [0.0, 0.0]

    def on_step(self, step, epoch, batch, out: StepOut) -> None:
        self.flops += out.host_flops
        s = out.sums
        self.settle[0] += s["free_time"] + s["nudged_time"]
        self.settle[1] += s["free_steps"] + s["nudged_steps"]

    def end_train(self, epoch) -> None:
        self.c1 = self.counts()

    def on_epoch(self, epoch, stats, history) -> None:
        self.acc.add_epoch(self.c0._asdict(), self.c1._asdict(), self.counts()._asdict(), n=self.n_train,
                           host_flops=self.flops, settle=(float(self.settle[0]), float(self.settle[1])),
                           test=(self.n_test, stats.test_time_mean, stats.test_steps_mean))


class ProgressObserver(Observer):
    """One line per finished epoch."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_epoch(self, epoch, s, history) -> None:
        from tqdm.auto import tqdm

        tqdm.write(
            f"epoch {epoch}/{self.epochs}: train loss {s.train_loss:.4f} acc {s.train_accuracy:.4f} | test acc "
            f"{s.test_accuracy:.4f} | {s.epoch_seconds:.1f}s | steps free {s.free_steps_mean:.1f} nudged {s.nudged_steps_mean:.1f}"
        )

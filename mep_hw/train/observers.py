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

CHECKPOINT_FORMAT = 3  # 2: weight store + host optimizer through the write path (issue 12); 3: the trace
#                        interval in progress (issue 11)


class StepOut(NamedTuple):
    """What one EP training step hands its observers."""

    x: Tensor  # the batch
    result: object  # the EPResult
    sums: object  # batch_sums (a BatchSums on the device, or a dict of floats): settle statistics, loss, correct
    host_flops: int  # the host's arithmetic in this step
    neuron_ops: int = 0  # the learning rule's neuron-circuit operations in this step (not the settles')


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
    the run stops, with the status and the error (one of :data:`mep_hw.train.guards.STATUSES`).

    Placed after the :class:`CheckpointObserver`, it records an epoch only once that epoch's
    checkpoint is on disk: a run that fails writing it (a full disk) leaves ``metrics.json`` and
    ``checkpoint.pt`` agreeing on the last saved epoch. When the stop itself cannot be written
    (the disk is full or read-only), the run's error is what is reported."""

    def __init__(self, path: Path, static: Callable[[], dict], history: list, epochs: int):
        self.path, self.static, self.history, self.epochs = path, static, list(history), epochs

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
        self.history = list(history)  # a snapshot: fit appends the next epoch before its checkpoint
        self.write("running" if epoch < self.epochs else "completed")

    def on_stop(self, status, error) -> None:
        self.write(status, error)


class TraceObserver(Observer):
    """Writes an interval of ``trace.h5`` every ``every`` steps or epochs (see
    :mod:`mep_hw.train.tracing`) and appends each epoch's metrics to ``/epochs``. Settle
    statistics, loss and accuracy are averaged over the steps since the previous interval; what
    needs extra work (the free-state energy, the weights and the device state) is computed only
    when an interval is due. The run's last step (epoch ``epochs``) is always recorded.

    The sums of the interval in progress are the observer's state (:meth:`state_dict`, part of
    the checkpoint): a run resumed at an epoch boundary in the middle of an interval records the
    same averages as a run that never stopped. Place it before the :class:`CheckpointObserver`:
    its epoch row is then written before the checkpoint (a resume from the previous checkpoint
    trims it), never missing from a checkpointed epoch."""

    def __init__(self, tracer, every: TraceEvery, model, steps_per_epoch: int, extra: Callable[[], dict] | None = None,
                 *, epochs: int | None = None):
        self.tracer, self.every, self.model = tracer, every, model
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs  # the run's last epoch (None: the last step is not forced)
        self.acc = StepTotals()
        self.extra = extra  # more datasets per interval (e.g. tiki-taka's fast arrays and buffers)

    def state_dict(self) -> dict[str, float]:
        """The running sums of the interval in progress."""
        return self.acc.state_dict()

    def load_state_dict(self, state: dict[str, float] | None) -> None:
        self.acc.load_state_dict(state)

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
        if self.every.due(step, epoch, epoch_end=last, run_end=last and epoch == self.epochs):
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
        self.flops = self.neuron_ops = 0
        self.totals = StepTotals()  # settle time and steps, summed on the device, read once per epoch

    def on_step(self, step, epoch, batch, out: StepOut) -> None:
        self.flops += out.host_flops
        self.neuron_ops += out.neuron_ops
        self.totals.add(out.sums)

    def end_train(self, epoch) -> None:
        self.c1 = self.counts()

    def on_epoch(self, epoch, stats, history) -> None:
        s = self.totals.sums
        settle = (s["free_time"] + s["nudged_time"], s["free_steps"] + s["nudged_steps"])
        self.acc.add_epoch(self.c0._asdict(), self.c1._asdict(), self.counts()._asdict(), n=self.n_train,
                           host_flops=self.flops, neuron_ops=self.neuron_ops, settle=settle,
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

"""The training loop itself, independent of what is trained: epochs of shuffled minibatches, a
trainer that takes a step per batch and evaluates per epoch, and observers that record.

A *trainer* has ``begin_epoch(epoch)``, ``step(x, y, generator) -> out`` (anything its observers
understand), ``end_epoch(epoch, seconds) -> stats`` (evaluation included; a NamedTuple) and
``state_dict`` / ``load_state_dict``. An *observer* (:class:`Observer`) is told of every step,
of the end of the training pass of an epoch (before evaluation), of every finished epoch and of
how the run stopped; metrics files, traces, cost accounting and checkpoints are observers, so the
loop is the same for EP on a layered Hopfield network (:func:`mep_hw.train.train`) and for the
benchmark runner's optimizers on an ``nn.Sequential``.

Randomness: the shuffle of epoch e comes from a generator seeded by (seed, e) and is handed to
the trainer's step (e.g. for the sign of β), so a run resumed at an epoch boundary continues
exactly as if it had never stopped.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from mep_hw.train.augment import augment_generator

__all__ = ["Observer", "fit", "epoch_generator", "iterate_batches"]


def epoch_generator(seed: int, epoch: int, device="cpu") -> torch.Generator:
    """The generator of epoch ``epoch`` (1-based) of a run seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def iterate_batches(n: int, batch_size: int, generator: torch.Generator):
    """Index tensors of a shuffled pass over n samples (the last batch may be smaller)."""
    perm = torch.randperm(n, generator=generator)
    return perm.split(batch_size)


class Observer:
    """Records what a run does; every method is optional (the defaults do nothing)."""

    def begin_epoch(self, epoch: int) -> None: ...

    def on_step(self, step: int, epoch: int, batch: int, out: Any) -> None:
        """After the trainer's step on batch ``batch`` (0-based) of ``epoch``; ``step`` counts
        optimizer steps from the start of the run (1-based)."""

    def end_train(self, epoch: int) -> None:
        """After the training pass of ``epoch``, before its evaluation."""

    def on_epoch(self, epoch: int, stats: Any, history: Sequence[Any]) -> None:
        """After ``epoch`` was evaluated; ``history`` includes ``stats``."""

    def on_stop(self, status: str, error: str | None) -> None:
        """The run ended: ``completed``, or why not (``interrupted``, ``diverged``…)."""


def fit(
    trainer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    start: int = 1,
    history: Sequence[Any] = (),
    observers: Sequence[Observer] = (),
    on_batch: Callable[[int, int], None] | None = None,
    progress: bool | None = None,
    stop_errors: dict[type, str] | None = None,
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> list:
    """Train epochs ``start``…``epochs`` of ``trainer`` on (x, y); returns the history.

    ``on_batch(epoch, batch)`` is called after every step (tests interrupt runs with it).
    ``progress`` shows a bar (None: only on a terminal). An exception of a type in
    ``stop_errors`` (type → status; the first matching type in the mapping's order, unless the
    exception carries its own ``status``, as :class:`~mep_hw.errors.DivergedError` does) ends
    the run with that status (observers are told, with the message) and is re-raised;
    KeyboardInterrupt ends it as ``interrupted``. Every observer is told how the run stopped: an
    observer failing in ``on_stop`` (e.g. a full disk) does not keep the others from being told;
    after an error the original exception is the one raised. ``transform(x, generator)`` (data
    augmentation) replaces each training batch, drawing from :func:`augment_generator` of the
    epoch, not from the epoch's generator that shuffles and that the trainer draws from.
    """
    from tqdm.auto import tqdm

    history = list(history)
    n = x.shape[0]
    steps_per_epoch = -(-n // batch_size)
    statuses = dict(stop_errors or {})

    def stop(status: str, error: str | None, failed: bool = True) -> None:
        first = None
        for ob in observers:
            try:
                ob.on_stop(status, error)
            except Exception as e:  # told the others first; a stopping run keeps its own error
                first = first or e
        if first is not None and not failed:
            raise first

    try:
        for epoch in range(start, epochs + 1):
            gen = epoch_generator(seed, epoch)
            aug_gen = augment_generator(seed, epoch) if transform is not None else None
            batches = iterate_batches(n, batch_size, gen)
            trainer.begin_epoch(epoch)
            for ob in observers:
                ob.begin_epoch(epoch)
            bar = tqdm(batches, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False,
                       disable=(not progress) if progress is not None else None)
            t0 = time.perf_counter()
            for b, idx in enumerate(bar):
                idx = idx.to(x.device)
                xb = x.index_select(0, idx)
                if transform is not None:
                    xb = transform(xb, aug_gen)
                out = trainer.step(xb, y.index_select(0, idx), gen)
                step = (epoch - 1) * steps_per_epoch + b + 1
                for ob in observers:
                    ob.on_step(step, epoch, b, out)
                if on_batch is not None:
                    on_batch(epoch, b)
            seconds = time.perf_counter() - t0
            for ob in observers:
                ob.end_train(epoch)
            stats = trainer.end_epoch(epoch, seconds)
            history.append(stats)
            for ob in observers:
                ob.on_epoch(epoch, stats, history)
    except KeyboardInterrupt:
        stop("interrupted", f"interrupted during epoch {len(history) + 1}; resume with --resume")
        raise
    except tuple(statuses) as e:  # type: ignore[misc]
        stop(getattr(e, "status", None) or next(s for t, s in statuses.items() if isinstance(e, t)), str(e))
        raise
    stop("completed", None, failed=False)
    return history

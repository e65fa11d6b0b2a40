"""Helpers shared by the training tests: read a run folder's metrics, drop the wall-clock fields,
interrupt a run."""

import json

import pytest

from mep_hw.train import train


def metrics(run):
    return json.loads((run / "metrics.json").read_text())


def strip_times(history):
    return [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in history]


def run_interrupted(cfg, run_dir, epoch: int, batch: int) -> None:
    """Train ``cfg`` into ``run_dir`` and interrupt it (KeyboardInterrupt) after ``batch`` of ``epoch``."""

    def stop(e, b):
        if (e, b) == (epoch, batch):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, run_dir, progress=False, on_batch=stop)

"""Training traces: what a run records, resume without duplicates or gaps, a SIGKILLed run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mep_hw.errors import ConfigError
from mep_hw.io.runs import load_checkpoint
from mep_hw.io.trace import read_trace
from mep_hw.train import TrainConfig, train
from tests.train.runs import metrics, run_interrupted

SMALL = dict(dataset="digits", layers=(64, 16, 10), epochs=2, batch_size=50, limit_train=200, limit_test=100)


def test_a_traced_run_records_weights_settle_stats_and_epochs(tmp_path):
    train(TrainConfig(**SMALL, trace_every="3"), tmp_path / "r", progress=False)
    t = read_trace(tmp_path / "r" / "trace.h5")
    assert list(t.intervals["step"]) == [0, 3, 6]  # 4 batches per epoch, 8 steps
    assert list(t.intervals["epoch"]) == [0, 1, 2]
    ck = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert not np.array_equal(t.intervals["layers/W0/weight"][0], t.intervals["layers/W0/weight"][2])
    # step 0 holds the initial weights: a fresh model of the same seed
    from mep_hw.model import build_network

    c = TrainConfig(**SMALL)
    init = build_network(arch=None, layers=c.layers, input_shape=(64,), n_classes=10, seed=c.seed)
    np.testing.assert_array_equal(t.intervals["layers/W0/weight"][0], init.weights[0].detach().numpy())
    assert t.intervals["layers/W1/weight"].shape == (3, 10, 16)
    assert np.isnan(t.intervals["settle/free_steps_mean"][0]) and (t.intervals["settle/free_steps_mean"][1:] >= 0).all()
    assert np.isfinite(t.intervals["energy/free_mean"][1:]).all()
    m = metrics(tmp_path / "r")
    assert t.epochs["test_accuracy"].tolist() == [h["test_accuracy"] for h in m["history"]]
    assert t.config["trace_every"] == "3" and t.config["layers"] == [64, 16, 10]
    assert ck["epoch"] == 2


def test_a_device_run_traces_conductances_and_pulses(tmp_path):
    train(TrainConfig(**SMALL, device="pcm", set={"levels": 16}, lr=0.02, trace_every="1epoch"), tmp_path / "r", progress=False)
    t = read_trace(tmp_path / "r" / "trace.h5")
    assert list(t.intervals["step"]) == [0, 4, 8]
    assert t.units["intervals/layers/W0/g_plus"] == "uS"
    gp = t.intervals["layers/W0/g_plus"]
    assert gp.shape == (3, 16, 64) and (gp >= 0).all() and (gp <= 25.0 + 1e-3).all()
    up = t.intervals["layers/W0/pulses_up"]
    assert up[0] == 0 and (np.diff(up) >= 0).all() and up[-1] > 0
    assert up[-1] == metrics(tmp_path / "r")["pulses"][0]["pulses_up"]
    # the logical weight is the differential pair's mean, mapped back: w = w_scale · (G⁺ − G⁻) / (g_max − g_min)
    w = t.intervals["layers/W0/weight"][-1]
    assert np.corrcoef(w.ravel(), (gp[-1] - t.intervals["layers/W0/g_minus"][-1]).ravel())[0, 1] > 0.99


def test_resume_appends_without_duplicates_or_gaps(tmp_path):
    cfg = TrainConfig(**{**SMALL, "epochs": 3}, trace_every="1")
    train(cfg, tmp_path / "full", progress=False)
    run_interrupted(cfg, tmp_path / "cut", epoch=2, batch=2)
    cut = read_trace(tmp_path / "cut" / "trace.h5")
    assert list(cut.intervals["step"]) == list(range(0, 8))  # epoch 1 (steps 1–4) and 3 steps of epoch 2
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    a, b = read_trace(tmp_path / "full" / "trace.h5"), read_trace(tmp_path / "cut" / "trace.h5")
    assert list(b.intervals["step"]) == list(range(0, 13))
    assert list(b.epochs["epoch"]) == [1, 2, 3]
    for k in a.intervals:
        np.testing.assert_array_equal(a.intervals[k], b.intervals[k], err_msg=k)


def test_a_run_killed_with_sigkill_leaves_a_readable_trace_and_resumes(tmp_path):
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "mep_hw", "train", "--dataset", "digits", "--layers", "64,32,10", "--epochs", "40",
           "--batch-size", "20", "--limit-train", "400", "--limit-test", "50", "--trace-every", "1", "--quiet", "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(1200):  # wait until at least one epoch is done, then kill mid-epoch
            if (run / "metrics.json").exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.35)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    t = read_trace(run / "trace.h5")
    n = len(t.intervals["step"])
    assert n >= 21 and list(t.intervals["step"]) == list(range(n))
    assert all(v.shape[0] == n for v in t.intervals.values())
    done = metrics(run)["epochs_completed"]
    assert done >= 1
    # resume to a shorter end: the trace is trimmed to the checkpoint and continues from there
    subprocess.run(cmd[:9] + [str(done + 1)] + cmd[10:] + ["--resume"], env=env, check=True, capture_output=True)
    t = read_trace(run / "trace.h5")
    assert list(t.intervals["step"]) == list(range(20 * (done + 1) + 1))
    assert list(t.epochs["epoch"]) == list(range(1, done + 2))
    ck = load_checkpoint(run / "checkpoint.pt")
    assert torch.equal(torch.from_numpy(t.intervals["layers/W1/weight"][-1]), ck["model"]["weights.1"])


@pytest.mark.parametrize("value", ["0", "-3", "every", "2 weeks", "1.5"])
def test_bad_trace_every_is_a_config_error(value):
    with pytest.raises(ConfigError, match="trace_every"):
        TrainConfig(**SMALL, trace_every=value)

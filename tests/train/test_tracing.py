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


@pytest.mark.slow
def test_a_traced_run_records_weights_settle_stats_and_epochs(tmp_path):
    train(TrainConfig(**SMALL, trace_every="3"), tmp_path / "r", progress=False)
    t = read_trace(tmp_path / "r" / "trace.h5")
    assert list(t.intervals["step"]) == [0, 3, 6, 8]  # 4 batches per epoch, 8 steps: the last step too
    assert list(t.intervals["epoch"]) == [0, 1, 2, 2]
    ck = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert not np.array_equal(t.intervals["layers/W0/weight"][0], t.intervals["layers/W0/weight"][2])
    # step 0 holds the initial weights: a fresh model of the same seed
    from mep_hw.model import build_network

    c = TrainConfig(**SMALL)
    init = build_network(arch=None, layers=c.layers, input_shape=(64,), n_classes=10, seed=c.seed)
    np.testing.assert_array_equal(t.intervals["layers/W0/weight"][0], init.weights[0].detach().numpy())
    assert t.intervals["layers/W1/weight"].shape == (4, 10, 16)
    np.testing.assert_array_equal(t.intervals["layers/W1/weight"][-1], ck["model"]["weights.1"].numpy())  # the end state
    assert np.isnan(t.intervals["settle/free_steps_mean"][0]) and (t.intervals["settle/free_steps_mean"][1:] >= 0).all()
    assert np.isfinite(t.intervals["energy/free_mean"][1:]).all()
    m = metrics(tmp_path / "r")
    assert t.epochs["test_accuracy"].tolist() == [h["test_accuracy"] for h in m["history"]]
    assert t.config["trace_every"] == "3" and t.config["layers"] == [64, 16, 10]
    # settle times are in units of the time constant τ, not dimensionless
    assert t.units["epochs/free_time_mean"] == t.units["epochs/nudged_time_mean"] == "tau"
    assert t.units["epochs/epoch_seconds"] == "s" and t.units["epochs/free_steps_mean"] == "steps"
    assert ck["epoch"] == 2


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("every,steps", [("5", [0, 5, 10, 12]), ("2epoch", [0, 8, 12])])
def test_a_resumed_trace_equals_the_uninterrupted_one_when_intervals_span_the_resume(tmp_path, every, steps):
    # 4 steps an epoch; every 5 steps the interval (5, 10] spans the checkpoint at step 8, so its
    # averages need the sums of steps 6–8 from before the interruption
    cfg = TrainConfig(**{**SMALL, "epochs": 3}, trace_every=every)
    train(cfg, tmp_path / "full", progress=False)
    run_interrupted(cfg, tmp_path / "cut", epoch=3, batch=1)
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    a, b = read_trace(tmp_path / "full" / "trace.h5"), read_trace(tmp_path / "cut" / "trace.h5")
    assert list(a.intervals["step"]) == list(b.intervals["step"]) == steps  # the run's last step is recorded
    for k in a.intervals:
        np.testing.assert_array_equal(a.intervals[k], b.intervals[k], err_msg=k)
    for k in a.epochs:
        if not k.endswith("seconds"):
            np.testing.assert_array_equal(a.epochs[k], b.epochs[k], err_msg=k)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_leaves_a_readable_trace_and_resumes(tmp_path):
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "mep_hw", "train", "--dataset", "digits", "--layers", "64,32,10", "--epochs", "40",
           "--batch-size", "20", "--limit-train", "400", "--limit-test", "50", "--trace-every", "1", "--quiet", "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(1200):  # wait until at least one epoch is done, then kill mid-epoch
            if proc.poll() is not None or ((run / "metrics.json").exists() and metrics(run)["epochs_completed"] >= 1):
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


def test_batch_sums_reduced_together_equal_the_sum_of_each_batch():
    """StepTotals collects the batches and reduces them together (every FOLD_EVERY steps and when
    read): the totals equal the sum of each batch's own sums; a guard reads the same."""
    from mep_hw.ep import EPConfig, ep_gradients
    from mep_hw.model import LayeredHopfield, one_hot
    from mep_hw.settle import SettleConfig
    from mep_hw.train.guards import RunGuard
    from mep_hw.train.tracing import StepTotals, batch_sums

    m = LayeredHopfield((8, 12, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    cfg = EPConfig(beta=0.5, estimator="symmetric", free=SettleConfig(solver="block", atol=1e-6, max_steps=3),
                   nudged=SettleConfig(solver="block", atol=1e-6, max_steps=2))
    tot, guard, each = StepTotals(), RunGuard(), []
    tot.FOLD_EVERY = 3  # fold several times over the 7 batches
    guard.start_epoch(1, 70)
    for i in range(7):
        x = torch.rand(10, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (10,), generator=g)
        res = ep_gradients(m, x, one_hot(y, 3, torch.float64), cfg)
        tot.add(batch_sums(res, y))
        guard.after_step(i + 1, 1, batch_sums(res, y), [])
        each.append(batch_sums(res, y).as_dict())  # reduced alone
    got = tot.sums
    for k in got:
        assert got[k] == pytest.approx(sum(e[k] for e in each), rel=1e-12, abs=1e-12), k
    assert got["n"] == 70 and got["n_nudged"] == 140 and got["free_limit"] > 0  # 3 sweeps are too few for some
    assert guard._totals.sums["free_limit"] == got["free_limit"]

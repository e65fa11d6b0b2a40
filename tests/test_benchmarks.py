"""The benchmark scripts run end to end on tiny problems and write what they promise."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mep_hw.benchmarks import foundation, runner
from mep_hw.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_foundation_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "f.json"
    foundation.main(["--dataset", "digits", "--layers", "64,32,10", "--epochs", "2", "--limit-train", "200",
                     "--limit-test", "100", "--out", str(out)])
    r = json.loads(out.read_text())
    assert 0 <= r["ep"]["test_accuracy"] <= 1 and 0 <= r["backprop"]["test_accuracy"] <= 1
    assert len(r["ep"]["epoch_seconds"]) == 2 and len(r["backprop"]["epoch_seconds"]) == 2
    assert r["ep_over_backprop_epoch_time"] > 0
    assert r["ep"]["free_steps_mean_all"] >= 0 and r["ep"]["nudged_steps_mean_all"] >= 0


def test_deep_benchmark_interleaves_backprop_and_writes_its_figures(tmp_path):
    from mep_hw.benchmarks import deep

    out = tmp_path / "d.json"
    deep.main(["--dataset", "digits", "--layers", "64,40,40,10", "--epochs", "2", "--limit-train", "200",
               "--limit-test", "100", "--set", "lr_width=20", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["config"]["estimator"] == "one-sided" and r["config"]["lr_width"] == 20
    assert len(r["ep"]["test_accuracy_history"]) == 2 and len(r["backprop"]["test_accuracy_history"]) == 2
    assert all(t > 0 for t in r["backprop"]["epoch_seconds"]) and r["ep_over_backprop_epoch_time"] > 0
    assert r["ep"]["free_steps_mean_all"] > 0 and r["ep"]["nudged_phases"] == 1


def tiny_config(tmp_path, **over):
    cfg = {"name": "tiny", "dataset": "digits", "model": {"type": "mlp", "layers": [64, 32, 10]}, "epochs": 2,
           "batch_size": 64, "limit_train": 300, "limit_test": 100,
           "optimizers": {"smep": {"lr": 0.05}, "sgd": {"lr": 0.1}, "adam": {"lr": 0.003}}}
    cfg.update(over)
    import yaml

    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.slow
def test_runner_writes_logs_table_and_plots(tmp_path):
    out = tmp_path / "out"
    code = runner.main(["--config", str(tiny_config(tmp_path)), "--baselines", "smep", "sdmep", "local_ep",
                        "natural_ep", "muon_backprop", "sgd", "adam", "--output", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert set(res) == {"smep", "sdmep", "local_ep", "natural_ep", "muon_backprop", "sgd", "adam"}
    for name, r in res.items():
        assert len(r["history"]) == 2 and 0 <= r["test_accuracy"] <= 1, name
        assert (out / f"{name}.json").exists()
    assert res["smep"]["mode"] == "ep" and res["adam"]["mode"] == "backprop"
    assert res["smep"]["history"][-1]["nudged_steps_mean"] >= 0
    table = (out / "summary.md").read_text()
    assert "| smep | ep |" in table and "step ÷ backprop step" in table
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_shipped_configs_load_and_build():
    import torch

    for name, shape in (("mnist_mlp", (1, 784)), ("mnist_cnn", (1, 1, 28, 28))):
        cfg = runner.load_config(name)
        model = runner.build_model(cfg.model, shape, 0)
        assert model(torch.zeros(*shape)).shape == (1, 10)


def test_runner_rejects_bad_configs(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no shipped config of that name"):
        runner.load_config("cifar_resnet")
    bad = tiny_config(tmp_path, learning_rate=1)
    with pytest.raises(ConfigError, match="unknown key\\(s\\) learning_rate"):
        runner.load_config(str(bad))
    bad = tiny_config(tmp_path, optimizers={"lion": {}})
    with pytest.raises(ConfigError, match="unknown baseline\\(s\\) lion"):
        runner.load_config(str(bad))
    assert runner.main(["--config", "nope", "--output", str(tmp_path / "o")]) == 2
    assert "runner: error" in capsys.readouterr().err


@pytest.mark.slow
def test_runner_is_a_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "mep_hw.benchmarks.runner", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--baselines" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", ["quickstart.py", "demo_ep_vs_backprop.py"])
def test_examples_run(script, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--epochs", "2"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout


@pytest.mark.slow
def test_brian2_benchmark_writes_agreement_times_and_accuracy(tmp_path):
    import importlib

    bench = importlib.import_module("mep_hw.benchmarks.brian2")
    out = tmp_path / "b2.json"
    assert bench.main(["--networks", "64-32-10@50", "--rounds", "1", "--seeds", "0", "--no-cython", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    s = r["settle"]["64-32-10@50"]
    assert s["train_defaults"]["max_abs_diff_states_vs_torch"]["brian2"] < 1e-5
    assert s["float64_tight"]["max_abs_diff_states"] < 1e-12 and s["float64_tight"]["steps_equal"]
    # per step = (100-step run − 1-step run) / 99: one round on a loaded machine may make it negative
    assert math.isfinite(s["per_step_ms"]["brian2"]) and s["train_defaults"]["seconds_median"]["euler"] > 0
    acc = r["accuracy"]["runs"]["0"]
    assert abs(acc["brian2"]["test_accuracy"] - acc["euler"]["test_accuracy"]) <= 0.02


def test_epoch_ratio_interleaves_ep_and_backprop(tmp_path):
    from mep_hw.benchmarks import epoch_ratio

    out = tmp_path / "r.json"
    epoch_ratio.main(["--dataset", "digits", "--layers", "64,32,10", "--epochs", "2", "--limit-train", "200",
                      "--limit-test", "100", "--threads", "1", "--solver", "block", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["config"]["solver"] == "block"
    (run,) = r["runs"]
    assert run["threads"] == 1 and len(run["ep_epoch_seconds"]) == 2 and len(run["backprop_test_accuracy"]) == 2
    assert all(s > 0 for s in run["ep_epoch_seconds"] + run["backprop_epoch_seconds"])
    assert run["ratio_median"] > 0 and len(run["load_average_before"]) == 3


def test_cuda_check_skips_without_cuda_and_runs_on_the_cpu(tmp_path, capsys):
    import torch

    from mep_hw.benchmarks import cuda_check

    out = tmp_path / "c.json"
    if not torch.cuda.is_available():
        assert cuda_check.main(["--out", str(out)]) == 0
        assert "skipped" in capsys.readouterr().out and not out.exists()
    cuda_check.main(["--device", "cpu", "--layers", "784,20,10", "--batch", "8", "--check-every", "1", "3",
                     "--warmup", "2", "--batches", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and {r["solver"] for r in rows} == {"euler", "block"}
    assert {r["poll"] for r in rows} == {"sync", "async"}
    for r in rows:
        assert r["settle_loop_iterations"] > 0 and r["settle_ms_per_iteration"] > 0 and r["ep_step_ms"] > 0
        assert r["settle_syncs_per_iteration"] is None  # counted on CUDA only
    dev = [r for r in rows if "device_card" in r]  # the device step: once per net, batch and solver
    assert len(dev) == 2 and all(r["device_error"] is None and r["device_step_ms"] > 0 for r in dev)


def test_settle_speed_times_solvers_and_compaction_thresholds(tmp_path):
    from mep_hw.benchmarks import settle_speed

    out = tmp_path / "s.json"
    settle_speed.main(["--dataset", "digits", "--layers", "64,32,10", "--warmup", "4", "--batches", "3", "--rounds", "2",
                       "--thresholds", "0", "inf", "--out", str(out)])
    r = json.loads(out.read_text())
    assert {(row["solver"], row["compact_work"]) for row in r["rows"]} == {
        ("euler", 0.0), ("euler", "inf"), ("block", 0.0), ("block", "inf")}
    assert all(row["ms_per_batch"] > 0 for row in r["rows"])
    assert r["steps"]["block"]["nudged_mean"] <= r["steps"]["euler"]["nudged_mean"]


def test_trace_overhead_times_traced_runs_against_an_untraced_one(tmp_path):
    from mep_hw.benchmarks import trace_overhead

    out = tmp_path / "t.json"
    trace_overhead.main(["--dataset", "digits", "--layers", "64,32,10", "--limit-train", "200", "--limit-test", "50",
                         "--rounds", "2", "--every", "1epoch", "2", "--out", str(out)])
    r = json.loads(out.read_text())
    assert set(r["variants"]) == {"1epoch", "2"} and len(r["untraced_seconds"]) == 2
    for v in r["variants"].values():
        assert len(v["overhead_per_round"]) == 2 and v["overhead_median"] > -1.0
        assert len(v["in_run_share_per_round"]) == 2 and v["in_run_share_median"] > 0
    assert 0 <= r["test_accuracy"] <= 1

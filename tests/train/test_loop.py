"""The training loop: run folder, resume after interruption, determinism, failure handling."""

import pytest
import torch

from mep_hw.errors import ConfigError, SettleError
from mep_hw.io.runs import load_checkpoint
from mep_hw.settle import SOLVER_NAMES
from mep_hw.train import TrainConfig, train
from tests.train.runs import metrics, run_interrupted, strip_times

SMALL = dict(dataset="digits", layers=(64, 32, 10), epochs=3, batch_size=50, limit_train=200, limit_test=100)


@pytest.mark.slow
def test_run_folder_has_config_checkpoint_and_metrics(tmp_path):
    res = train(TrainConfig(**SMALL), tmp_path / "run", progress=False)
    m = metrics(tmp_path / "run")
    assert m["status"] == "completed" and m["epochs_completed"] == 3
    assert 0.0 <= m["test_accuracy"] <= 1.0 and m["test_accuracy"] == res.test_accuracy
    for key in ("epoch", "train_loss", "test_accuracy", "epoch_seconds", "free_steps_mean", "nudged_steps_mean"):
        assert key in m["history"][0]
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3]
    assert m["history"][-1]["train_loss"] < m["history"][0]["train_loss"]
    cfg_text = (tmp_path / "run" / "config.toml").read_text()
    assert 'dataset = "digits"' in cfg_text and "limit_train = 200" in cfg_text
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 3


@pytest.mark.slow
def test_same_seed_same_metrics_other_seed_other_metrics(tmp_path):
    a = train(TrainConfig(**SMALL), tmp_path / "a", progress=False)
    b = train(TrainConfig(**SMALL), tmp_path / "b", progress=False)
    c = train(TrainConfig(**SMALL, seed=1), tmp_path / "c", progress=False)
    ha, hb, hc = (strip_times(metrics(tmp_path / r)["history"]) for r in "abc")
    assert ha == hb
    assert ha != hc
    assert a.test_accuracy == b.test_accuracy


@pytest.mark.slow
def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(**SMALL)
    train(cfg, tmp_path / "full", progress=False)
    run_interrupted(cfg, tmp_path / "cut", epoch=2, batch=1)
    m = metrics(tmp_path / "cut")
    assert m["status"] == "interrupted" and m["epochs_completed"] == 1 and "--resume" in m["error"]
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for k in full["model"]:
        assert torch.equal(full["model"][k], cut["model"][k]), k
    assert strip_times(metrics(tmp_path / "cut")["history"]) == strip_times(metrics(tmp_path / "full")["history"])


@pytest.mark.slow
def test_resume_can_extend_epochs_but_not_change_other_options(tmp_path):
    cfg = TrainConfig(**{**SMALL, "epochs": 1})
    train(cfg, tmp_path / "r", progress=False)
    res = train(cfg.replace(epochs=2), tmp_path / "r", resume=True, explicit={"epochs"}, progress=False)
    assert [h.epoch for h in res.history] == [1, 2]
    with pytest.raises(ConfigError, match=r"lr=0.5 \(run has 0.001\).*start a new run"):
        train(cfg.replace(lr=0.5), tmp_path / "r", resume=True, explicit={"lr"}, progress=False)


def test_an_existing_run_is_never_overwritten(tmp_path):
    train(TrainConfig(**{**SMALL, "epochs": 1}), tmp_path / "r", progress=False)
    before = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(TrainConfig(**SMALL), tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == before
    with pytest.raises(ConfigError, match="holds no run"):
        train(TrainConfig(**SMALL), tmp_path / "empty", resume=True, progress=False)


def test_a_diverging_run_records_the_failure_and_keeps_its_checkpoint(tmp_path):
    cfg = TrainConfig(**{**SMALL, "activation": "sigmoid", "dt": 3.0, "epochs": 1, "max_steps": 100, "estimator": "symmetric"})
    with pytest.raises(SettleError, match="NONFINITE"):
        train(cfg, tmp_path / "d", progress=False)
    m = metrics(tmp_path / "d")
    assert m["status"] == "diverged" and "lower dt" in m["error"]


def test_layers_must_fit_the_dataset(tmp_path):
    with pytest.raises(ConfigError, match="do not fit dataset 'digits', which has 64 inputs and 10 classes"):
        train(TrainConfig(**{**SMALL, "layers": (784, 10)}), tmp_path / "x", progress=False)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"epochs": 0}, "epochs=0 must be an integer ≥ 1"),
        ({"lr": -1.0}, "lr=-1.0 must be a finite number > 0"),
        ({"beta": 0.0}, "beta=0.0 must be a finite number > 0"),
        ({"solver": "rk45"}, "solver='rk45' is not valid; choose one of: " + ", ".join(SOLVER_NAMES)),
        ({"beta": 1.0, "estimator": "symmetric"}, r"beta=1 ≥ 1 with the MSE cost and a −β phase \(symmetric estimator\)"),
        ({"beta": 2.0, "estimator": "one-sided", "random_sign": True}, r"beta=2 ≥ 1 .*\(random sign\)"),
        ({"cosine_cycles": "2,0"}, "cosine_cycles='2,0' must be one or more whole numbers of epochs ≥ 1"),
        ({"cosine_cycles": "2", "schedule": "constant"}, "cosine_cycles=2 needs --schedule cosine"),
        ({"dataset": "cifar"}, "dataset='cifar' is not valid"),
        ({"layers": "784,x,10"}, "comma-separated integers"),
        ({"momentum": 1.0}, r"momentum=1.0 must be in \[0, 1\)"),
        ({"torch_device": "tpu:9"}, "not a torch device"),
        ({"dt": float("nan")}, "dt=nan must be a finite number > 0"),
    ],
)
def test_bad_options_are_config_errors(change, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**{**SMALL, **change})


def test_unknown_keys_in_a_config_file_are_named():
    with pytest.raises(ConfigError, match="unknown option\\(s\\) learning_rate; valid options: dataset"):
        TrainConfig.from_dict({"learning_rate": 0.1}, source="x.toml")


@pytest.mark.slow
def test_a_corrupt_checkpoint_or_config_is_a_typed_error_and_is_left_alone(tmp_path):
    from mep_hw.errors import DataError

    run = tmp_path / "r"
    train(TrainConfig(**{**SMALL, "epochs": 1}), run, progress=False)
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"checkpoint.pt is not an mep_hw checkpoint \(not a torch archive\)"):
        train(TrainConfig(**SMALL), run, resume=True, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == b"not a checkpoint"
    (run / "config.toml").write_text("dataset = [")
    with pytest.raises(ConfigError, match="config.toml is not valid TOML"):
        train(TrainConfig(**SMALL), run, resume=True, progress=False)

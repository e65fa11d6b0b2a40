"""Run guards, through the public train(): a resume continues exactly or refuses with the reason
(and changes nothing); an extension of --epochs is recorded and config.toml reruns it; exploding
weights and settles that never converge stop the run with a status; step-limit warnings."""

import math
import shutil

import pytest
import torch

from mep_hw.errors import ConfigError, DataError, DivergedError
from mep_hw.io.runs import load_checkpoint, read_toml
from mep_hw.train import TrainConfig, train
from mep_hw.train.guards import GuardConfig, RunGuard, SettleWarning, drive_scales
from tests.conftest import make_idx_folder
from tests.train.runs import metrics, strip_times

SMALL = dict(dataset="digits", layers=(64, 16, 10), batch_size=50, limit_train=200, limit_test=100)  # 4 steps an epoch


def _files(run):
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def _same_run(a, b):
    assert strip_times(metrics(a)["history"]) == strip_times(metrics(b)["history"])
    ka, kb = load_checkpoint(a / "checkpoint.pt")["model"], load_checkpoint(b / "checkpoint.pt")["model"]
    for k in ka:
        assert torch.equal(ka[k], kb[k]), k


# ------------------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_a_resume_without_its_checkpoint_is_refused_and_changes_nothing(tmp_path):
    run = tmp_path / "r"
    train(TrainConfig(**SMALL, epochs=2), run, progress=False)
    (run / "checkpoint.pt").unlink()
    before = _files(run)
    with pytest.raises(DataError, match=r"checkpoint.pt is missing but .*metrics.json records 2 finished epoch\(s\); "
                                        r"continuing would restart from epoch 1 and rewrite that history"):
        train(TrainConfig(**SMALL, epochs=2), run, resume=True, progress=False)
    assert _files(run) == before


@pytest.mark.slow
def test_a_checkpoint_older_than_the_metrics_is_refused(tmp_path):
    train(TrainConfig(**SMALL, epochs=1), tmp_path / "one", progress=False)
    train(TrainConfig(**SMALL, epochs=2), tmp_path / "two", progress=False)
    shutil.copy(tmp_path / "one" / "checkpoint.pt", tmp_path / "two" / "checkpoint.pt")
    with pytest.raises(DataError, match=r"checkpoint.pt holds only epoch 1 but .* records 2 finished epoch\(s\)"):
        train(TrainConfig(**SMALL, epochs=2), tmp_path / "two", resume=True, progress=False)


@pytest.mark.slow
def test_fewer_epochs_than_finished_are_refused_and_config_toml_is_untouched(tmp_path):
    run = tmp_path / "r"
    cfg = TrainConfig(**SMALL, epochs=2)
    train(cfg, run, progress=False)
    before = _files(run)
    with pytest.raises(ConfigError, match="--epochs 1: the run in .* has already finished 2 epochs and a resume cannot undo them"):
        train(cfg.replace(epochs=1), run, resume=True, explicit={"epochs"}, progress=False)
    assert _files(run) == before


@pytest.mark.slow
def test_a_config_toml_that_disagrees_with_metrics_json_is_refused(tmp_path):
    run = tmp_path / "r"
    train(TrainConfig(**SMALL, epochs=2), run, progress=False)
    text = (run / "config.toml").read_text()
    (run / "config.toml").write_text(text.replace("epochs = 2", "epochs = 1"))  # what the old resume wrote
    with pytest.raises(DataError, match=r"config.toml and .*metrics.json disagree \(epochs: 1 vs 2\)"):
        train(TrainConfig(**SMALL), run, resume=True, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_an_extension_is_recorded_and_config_toml_reruns_it_exactly(tmp_path, schedule):
    run = tmp_path / "ext"
    cfg = TrainConfig(**SMALL, epochs=2, schedule=schedule)
    train(cfg, run, progress=False)
    w2 = load_checkpoint(run / "checkpoint.pt")["model"]
    res = train(cfg.replace(epochs=3), run, resume=True, explicit={"epochs"}, progress=False)
    assert [h.epoch for h in res.history] == [1, 2, 3]
    stored = read_toml(run / "config.toml")
    m = metrics(run)
    assert stored["epochs"] == 3 and m["config"]["epochs"] == 3 and m["epochs_completed"] == 3 and m["status"] == "completed"
    assert m["resumes"] == [{"at_epoch": 2, "changes": {"epochs": [2, 3]}}]
    if schedule == "cosine":
        # the two-epoch cosine had annealed lr to 0; the added epoch is a new cycle (a warm
        # restart), recorded, so the weights move again
        assert stored["cosine_cycles"] == [2]
        w3 = load_checkpoint(run / "checkpoint.pt")["model"]
        assert not torch.equal(w2["weights.0"], w3["weights.0"])
    else:
        assert "cosine_cycles" not in stored
        train(cfg.replace(epochs=3), tmp_path / "long", progress=False)  # the extended run is the longer run
        _same_run(run, tmp_path / "long")
    train(TrainConfig.from_dict(stored), tmp_path / "again", progress=False)
    _same_run(run, tmp_path / "again")


@pytest.mark.slow
def test_an_interrupted_cosine_run_ended_early_keeps_its_planned_schedule(tmp_path):
    from tests.train.runs import run_interrupted

    cfg = TrainConfig(**SMALL, epochs=4)
    run_interrupted(cfg, tmp_path / "cut", epoch=2, batch=1)
    train(cfg.replace(epochs=3), tmp_path / "cut", resume=True, explicit={"epochs"}, progress=False)
    stored = read_toml(tmp_path / "cut" / "config.toml")
    assert stored["epochs"] == 3 and stored["cosine_cycles"] == [4]  # three epochs of a four-epoch cosine
    train(TrainConfig.from_dict(stored), tmp_path / "again", progress=False)
    _same_run(tmp_path / "cut", tmp_path / "again")


@pytest.mark.slow
def test_a_resume_may_read_its_data_from_a_new_folder(tmp_path):
    a = make_idx_folder(tmp_path / "a", gz=False)
    cfg = TrainConfig(dataset="mnist", data_dir=str(a), layers=(784, 16, 10), epochs=1, batch_size=20)
    train(cfg, tmp_path / "r", progress=False)
    b = tmp_path / "b"
    a.rename(b)
    with pytest.raises(ConfigError, match=r"lr=0.5 \(run has 0.001\)"):  # other options still may not change
        train(cfg.replace(data_dir=str(b), lr=0.5), tmp_path / "r", resume=True, explicit={"data_dir", "lr"}, progress=False)
    train(cfg.replace(data_dir=str(b), epochs=2), tmp_path / "r", resume=True, explicit={"data_dir", "epochs"}, progress=False)
    m = metrics(tmp_path / "r")
    assert m["epochs_completed"] == 2 and read_toml(tmp_path / "r" / "config.toml")["data_dir"] == str(b)
    assert m["resumes"][-1]["changes"]["data_dir"] == [str(a), str(b)]


# ----------------------------------------------------------------------------------- health
@pytest.mark.slow
@pytest.mark.parametrize("opts", [dict(lr=1e6), dict(optimizer="sgd", lr=1e30)], ids=["adam-1e6", "sgd-1e30"])
def test_exploding_weights_stop_the_run_as_diverged(tmp_path, opts):
    run = tmp_path / "d"
    with pytest.raises(DivergedError, match=r"diverged at step 4 \(epoch 1\): W0 is exploding .*remedy: lower --lr") as e:
        train(TrainConfig(**SMALL, epochs=3, **opts), run, progress=False)
    assert e.value.status == "diverged"
    m = metrics(run)
    assert m["status"] == "diverged" and m["epochs_completed"] == 0 and m["history"] == []
    assert "remedy" in m["error"] and not (run / "checkpoint.pt").exists()  # no epoch was good


@pytest.mark.slow
def test_settles_that_never_converge_stop_the_run_as_not_settling(tmp_path):
    run = tmp_path / "n"
    with pytest.raises(DivergedError, match=r"not settling .*100 % of this epoch's 200 free-phase settles ended at the "
                                            r"step limit \(--max-steps 100\).*remedy: lower --dt") as e:
        train(TrainConfig(**SMALL, epochs=2, solver="euler", dt=50.0, max_steps=100), run, progress=False)  # block ignores dt
    assert e.value.status == "not_settling"
    assert metrics(run)["status"] == "not_settling"


@pytest.mark.slow
def test_many_nudged_settles_at_their_limit_warn_once_an_epoch_and_are_recorded(tmp_path):
    with pytest.warns(SettleWarning, match=r"epoch \d, step \d+: \d+ % of \d+ nudged-phase settles .* raise --nudged-max-steps \(now 1\)"):
        train(TrainConfig(**SMALL, epochs=2, nudged_max_steps=1), tmp_path / "w", progress=False)
    m = metrics(tmp_path / "w")
    assert m["status"] == "completed"
    assert [(w["epoch"], w["phase"]) for w in m["warnings"]] == [(1, "nudged"), (2, "nudged")]
    assert all(w["step_limit_frac"] > 0.5 for w in m["warnings"])


def _sums(n, free_limit, nudged=0.0):
    return {"n": float(n), "free_limit": float(free_limit), "n_nudged": float(2 * n), "nudged_limit": float(nudged)}


def test_the_guard_thresholds():
    ok = [torch.full((4, 16), 0.1)]  # drive scale √16 · 0.1 = 0.4
    g = RunGuard(GuardConfig(min_samples=100, check_every=1))
    g.start_epoch(1, 1000)
    with pytest.warns(SettleWarning, match="10 % of 50 free-phase settles"):
        g.after_step(1, 1, _sums(50, 5), ok)  # 10 %: a warning
    assert [w["phase"] for w in g.warnings] == ["free"]
    with pytest.warns(SettleWarning):
        g.start_epoch(2, 1000)
        g.after_step(1, 2, _sums(50, 48), ok)  # 96 % of 50 samples: too few to stop, warns
    with pytest.raises(DivergedError, match="not settling") as e:
        g.after_step(2, 2, _sums(50, 48), ok)  # 96 % of 100
    assert e.value.status == "not_settling"
    g.start_epoch(3, 60)
    with pytest.warns(SettleWarning):
        g.after_step(1, 3, _sums(50, 50), ok)  # a short epoch decides at its end
    with pytest.raises(DivergedError, match="not settling"):
        g.end_epoch(2, 3, ok)
    limit = GuardConfig().drive_limit
    for scale, bad in ((0.99, False), (1.01, True)):
        w = [torch.full((4, 16), scale * limit / 4)]  # √16 · value = scale · limit
        g = RunGuard()
        g.start_epoch(1, 100)
        if bad:
            with pytest.raises(DivergedError, match="exploding"):
                g.end_epoch(1, 1, w)
        else:
            g.end_epoch(1, 1, w)
    nan = torch.zeros(3)
    nan[1] = math.nan
    with pytest.raises(DivergedError, match=r"b0 holds NaN or inf \(1 of 3 values\)"):
        RunGuard(names=["b0"]).end_epoch(1, 1, [nan])


def test_drive_scales_do_not_overflow_for_finite_weights():
    w = torch.full((2, 4), 1e30)  # its square overflows float32
    assert drive_scales([w]) == [pytest.approx(2e30)]
    assert math.isinf(drive_scales([torch.tensor([math.inf, 0.0])])[0])


# ------------------------------------------------------------- the loop's structure (fit, observers)
@pytest.mark.slow
def test_a_checkpoint_of_an_older_format_is_refused_with_the_reason(tmp_path):
    from mep_hw.io.runs import save_checkpoint
    from mep_hw.train.observers import CHECKPOINT_FORMAT

    run = tmp_path / "r"
    train(TrainConfig(**SMALL, epochs=1), run, progress=False)
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["format"] == CHECKPOINT_FORMAT == 3
    save_checkpoint(run / "checkpoint.pt", {**state, "format": 2})
    before = _files(run)
    with pytest.raises(ConfigError, match=r"checkpoint format 2, this one reads format 3\), so the run cannot be continued "
                                          r"exactly; start a new run with a different --out"):
        train(TrainConfig(**SMALL, epochs=2), run, resume=True, explicit={"epochs"}, progress=False)
    assert _files(run) == before


def test_the_cosine_cycles_of_an_in_array_schedule():
    from mep_hw.train.guards import restart_schedule
    from mep_hw.train.regimes import _Schedule

    class Regime:  # what restart_schedule reads of an in-array regime
        schedule = _Schedule(1.0, "cosine", 8)

    cfg = TrainConfig(**SMALL, epochs=3, cosine_cycles=(2,))
    r = Regime()
    assert restart_schedule(r, cfg, 1, 4) and (r.schedule.t, r.schedule.total) == (0, 8)
    for _ in range(8):
        r.schedule.step()
    assert r.schedule.lr == pytest.approx(0.0)  # the two-epoch cycle has annealed
    assert restart_schedule(r, cfg, 3, 4) and (r.schedule.t, r.schedule.total) == (0, 4) and r.schedule.lr == 1.0
    r.schedule = _Schedule(1.0, "cosine", 12)  # a resume at epoch 2 rebuilds it for the whole run …
    r.schedule.t = 4
    assert not restart_schedule(r, cfg, 2, 4)  # … and is given its cycle's length, keeping its step
    assert (r.schedule.t, r.schedule.total) == (4, 8) and r.schedule.lr == pytest.approx(0.5)
    assert not restart_schedule(r, cfg.replace(schedule="constant", cosine_cycles=None), 3, 4)


@pytest.mark.slow
def test_an_in_array_run_extended_on_resume_reruns_from_its_config_toml(tmp_path):
    cfg = TrainConfig(**SMALL, epochs=2, device="ideal", update="analog", lr=0.05, pulse_bl=20)
    run = tmp_path / "ext"
    train(cfg, run, progress=False)
    train(cfg.replace(epochs=3), run, resume=True, explicit={"epochs"}, progress=False)
    stored = read_toml(run / "config.toml")
    assert stored["cosine_cycles"] == [2] and metrics(run)["history"][-1]["lr"] < 0.05
    train(TrainConfig.from_dict(stored), tmp_path / "again", progress=False)
    _same_run(run, tmp_path / "again")


def test_fit_records_the_status_an_error_carries_and_tells_every_observer():
    from mep_hw.train.fit import Observer, fit

    class Trainer:
        def begin_epoch(self, epoch): ...

        def step(self, x, y, gen):
            raise DivergedError("not settling at step 1", "not_settling")

    told = []

    class Broken(Observer):  # e.g. metrics.json on a full disk
        def on_stop(self, status, error):
            told.append(("broken", status))
            raise OSError(28, "No space left on device")

    class Record(Observer):
        def on_stop(self, status, error):
            told.append(("record", status))

    with pytest.raises(DivergedError, match="not settling"):  # the run's own error, not the observer's
        fit(Trainer(), torch.zeros(4, 2), torch.zeros(4), epochs=1, batch_size=2, seed=0,
            observers=[Broken(), Record()], stop_errors={DivergedError: "diverged"}, progress=False)
    assert told == [("broken", "not_settling"), ("record", "not_settling")]

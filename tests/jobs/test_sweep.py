"""Sweeps: expansion and validation, failures recorded, resume skips done points, Dask = local pool."""

import csv

import pytest

from mep_hw.errors import ConfigError
from mep_hw.jobs.sweep import expand, load_sweep, run_sweep
from tests.train.runs import metrics, strip_times

BASE = """
[base]
dataset = "digits"
layers = "64,12,10"
epochs = 1
batch-size = 50
limit_train = 150
limit_test = 60
activation = "sigmoid"
"""


def _spec(tmp_path, body, name="s.toml"):
    p = tmp_path / name
    p.write_text(BASE + body)
    return p


def _rows(out):
    with (out / "results.csv").open() as f:
        return list(csv.DictReader(f))


def test_grid_and_zip_expand_with_card_fields(tmp_path):
    p = _spec(tmp_path, 'device = "fpga_q16"\n[axes]\nseed = [0, 1, 2]\n[zip]\n"set.weight_bits" = [8, 12]\n"set.weight_frac" = [6, 10]\n')
    pts = expand(load_sweep(p))
    assert len(pts) == 6
    assert {(pt.config.seed, pt.config.set["weight_bits"], pt.config.set["weight_frac"]) for pt in pts} == \
        {(s, b, f) for s in (0, 1, 2) for b, f in ((8, 6), (12, 10))}
    assert len({pt.name for pt in pts}) == 6 and pts[0].name.startswith("0000-seed=0_weight_bits=8")


@pytest.mark.parametrize("body,match", [
    ("[axes]\nlearning_rate = [0.1]\n", "unknown option 'learning_rate'"),
    ('device = "pcm"\n[axes]\n"set.colour" = [1, 2]\n', r"point 0 \(set.colour=1\).*colour"),
    ('device = "pcm"\n[axes]\n"set.levels" = [16, -4]\n', r"point 1 \(set.levels=-4\).*levels"),
    ("[axes]\nseed = 3\n", "must be a non-empty list"),
    ("[axes]\n", "no axes"),
    ("[zip]\nseed = [0, 1]\nlr = [0.1]\n", "one length"),
    ("[grid]\nseed = [0]\n", r"unknown table\(s\) \['grid'\]"),
])
def test_a_bad_sweep_fails_before_any_point_runs(tmp_path, body, match):
    p = _spec(tmp_path, body)
    with pytest.raises(ConfigError, match=match):
        run_sweep(p, tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out" / "points").exists()


def test_a_failing_point_is_recorded_and_a_rerun_skips_done_points(tmp_path):
    p = _spec(tmp_path, "[axes]\ndt = [1.0, 3.0]\n")  # dt = 3 makes the sigmoid network's settle diverge
    out = tmp_path / "out"
    res = run_sweep(p, out, workers=2, threads=1, progress=False)
    assert [res[i].status for i in (0, 1)] == ["completed", "diverged"]
    rows = _rows(out)
    assert [r["status"] for r in rows] == ["completed", "diverged"] and rows[0]["dt"] == "1.0"
    assert "NONFINITE" in rows[1]["error"] and rows[1]["test_accuracy"] == ""
    assert 0.0 <= float(rows[0]["test_accuracy"]) <= 1.0 and float(rows[0]["wall_seconds"]) > 0
    done = out / rows[0]["run_dir"] / "metrics.json"
    stamp = done.stat().st_mtime_ns
    again = run_sweep(p, out, workers=1, threads=1, progress=False)
    assert again[0].status == "skipped" and again[0].test_accuracy == res[0].test_accuracy
    assert again[1].status == "diverged"
    assert done.stat().st_mtime_ns == stamp  # not run again
    assert _rows(out)[0]["wall_seconds"] == rows[0]["wall_seconds"]


def test_dask_local_cluster_gives_the_local_pool_results(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    p = _spec(tmp_path, '[axes]\nseed = [0, 1]\n')
    local = run_sweep(p, tmp_path / "local", workers=2, threads=1, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = run_sweep(p, tmp_path / "dask", scheduler=cluster.scheduler_address, threads=1, progress=False)
    assert {i: r.status for i, r in remote.items()} == {0: "completed", 1: "completed"}
    assert {i: r.test_accuracy for i, r in remote.items()} == {i: r.test_accuracy for i, r in local.items()}
    a = [(r["seed"], r["test_accuracy"]) for r in _rows(tmp_path / "local")]
    assert a == [(r["seed"], r["test_accuracy"]) for r in _rows(tmp_path / "dask")]
    for r in _rows(tmp_path / "local"):  # the whole training history, not only the final figure
        h = [strip_times(metrics(d / r["run_dir"])["history"]) for d in (tmp_path / "local", tmp_path / "dask")]
        assert h[0] == h[1]

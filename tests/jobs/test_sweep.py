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


@pytest.mark.slow
def test_a_failing_point_is_recorded_and_a_rerun_skips_done_points(tmp_path):
    # dt = 3 makes the sigmoid network's settle diverge (within 100 steps; the default limit at dt = 3
    # is a 100 τ budget, 33 steps, which stops it as not settling first)
    p = _spec(tmp_path, "max_steps = 100\n[axes]\ndt = [1.0, 3.0]\n")
    out = tmp_path / "out"
    res = run_sweep(p, out, workers=2, threads=1, progress=False)
    assert [res[i].status for i in (0, 1)] == ["completed", "diverged"]
    rows = _rows(out)
    assert [r["status"] for r in rows] == ["completed", "diverged"] and rows[0]["dt"] == "1.0"
    # the guard sees the NaN weights the non-finite settle leaves (its settle counters are read at the
    # end of the epoch, the weights after every step)
    assert "holds NaN or inf" in rows[1]["error"] and rows[1]["test_accuracy"] == ""
    assert float(rows[0]["test_accuracy"]) == pytest.approx(metrics(out / rows[0]["run_dir"])["test_accuracy"], rel=1e-5)
    assert float(rows[0]["wall_seconds"]) > 0
    done = out / rows[0]["run_dir"] / "metrics.json"
    stamp = done.stat().st_mtime_ns
    again = run_sweep(p, out, workers=1, threads=1, progress=False)
    assert again[0].status == "skipped" and again[0].test_accuracy == res[0].test_accuracy
    assert again[1].status == "diverged"
    assert done.stat().st_mtime_ns == stamp  # not run again
    assert _rows(out)[0]["wall_seconds"] == rows[0]["wall_seconds"]


@pytest.mark.slow
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


MNIST_SPEC = '[base]\ndataset = "mnist"\nlayers = "784,8,10"\nepochs = 1\nbatch_size = 20\n[axes]\nseed = [0, 1]\n'


@pytest.mark.slow
def test_a_sweep_reads_its_data_from_data_dir_and_the_folder_does_not_name_the_point(tmp_path):
    from tests.conftest import make_idx_folder

    spec = tmp_path / "s.toml"
    spec.write_text(MNIST_SPEC)
    a = make_idx_folder(tmp_path / "a" / "mnist", gz=False)  # uncompressed: no MNIST checksum to match
    res = run_sweep(spec, tmp_path / "out", workers=1, threads=1, progress=False, data_dir=a.parent)
    assert [r.status for r in res.values()] == ["completed", "completed"]
    rows = _rows(tmp_path / "out")
    cfg = (tmp_path / "out" / rows[0]["run_dir"] / "config.toml").read_text()
    assert f'data_dir = "{a.parent}"' in cfg  # absolute, for workers anywhere
    b = tmp_path / "b"
    (tmp_path / "a").rename(b)  # the data moved: same points, nothing to rerun
    again = run_sweep(spec, tmp_path / "out", workers=1, threads=1, progress=False, data_dir=b)
    assert [r.status for r in again.values()] == ["skipped", "skipped"]
    assert [r["run_dir"] for r in _rows(tmp_path / "out")] == [r["run_dir"] for r in rows]


def test_missing_data_fails_the_sweep_before_any_point(tmp_path, monkeypatch, capsys):
    from mep_hw.cli import main
    from mep_hw.errors import DataError
    from mep_hw.jobs import sweep as S

    spec = tmp_path / "s.toml"
    spec.write_text(MNIST_SPEC)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no mnist IDX files in .*empty.*; no point was run"):
        run_sweep(spec, tmp_path / "out", workers=1, progress=False, data_dir=tmp_path / "empty")
    assert not (tmp_path / "out").exists()
    # the dry run says what is missing
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--dry-run", "--data-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "2 points valid, but the data is missing: no mnist IDX files" in err and err.count("\n") == 1
    # no data folder and an empty cache: the dry run says it will download; offline, the sweep
    # stops before any point with the download error
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    assert "mnist will be downloaded once before the first point" in capsys.readouterr().out

    def offline(name, dest, mirrors=None, timeout=60.0):
        raise DataError(f"could not download train-images-idx3-ubyte.gz of {name}: offline. Download the four IDX files "
                        "by hand into a folder and pass it with --data-dir (or set MEP_HW_DATA)")

    monkeypatch.setattr(S, "download_idx", offline)
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "could not download" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_points_that_diverge_or_stop_settling_are_recorded_and_the_sweep_goes_on(tmp_path):
    p = _spec(tmp_path, '[zip]\nlr = [0.001, 1e6, 0.001]\ndt = [1.0, 1.0, 50.0]\nactivation = ["hard_sigmoid", "hard_sigmoid", "hard_sigmoid"]\n')
    res = run_sweep(p, tmp_path / "out", workers=2, threads=1, progress=False)
    assert [res[i].status for i in range(3)] == ["completed", "diverged", "not_settling"]
    rows = _rows(tmp_path / "out")
    assert "exploding" in rows[1]["error"] and "remedy" in rows[1]["error"]
    assert "free-phase settles ended at the step limit" in rows[2]["error"]

"""compare: a report with its plots from two tiny runs (one on a device, traced) and a sweep."""

import struct

import pytest

from mep_hw.errors import ConfigError
from mep_hw.jobs.compare import compare
from mep_hw.jobs.sweep import run_sweep
from mep_hw.train import TrainConfig, train

SMALL = dict(dataset="digits", layers=(64, 12, 10), epochs=2, batch_size=50, limit_train=150, limit_test=60)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def test_compare_writes_report_and_every_plot(tmp_path):
    train(TrainConfig(**SMALL, trace_every="2"), tmp_path / "ideal", progress=False)
    train(TrainConfig(**SMALL, device="pcm", set={"levels": 16}, lr=0.02, trace_every="2"), tmp_path / "pcm", progress=False)
    spec = tmp_path / "s.toml"
    spec.write_text('[base]\ndataset = "digits"\nlayers = "64,12,10"\nepochs = 1\nlimit_train = 100\nlimit_test = 50\n'
                    'device = "pcm"\n[axes]\n"set.levels" = [4, 16]\n"set.read_noise" = [0.0, 0.02]\n')
    run_sweep(spec, tmp_path / "sweep", workers=2, threads=1, progress=False)
    report = compare([tmp_path / "ideal", tmp_path / "pcm", tmp_path / "sweep"], tmp_path / "rep")
    text = report.read_text()
    for png in ("curves.png", "weights_vs_conductances.png", "weights_over_training.png", "settle_steps.png",
                "pulses.png", "sweep_sweep_heatmap.png", "sweep_sweep_lines.png"):
        assert f"]({png})" in text, png
        w, h = _png_size(tmp_path / "rep" / png)
        assert w > 300 and h > 200
    assert "| pcm levels=16 | pcm | 2 |" in text and "| ideal (float) | none (float) | 2 |" in text
    assert "| 16 (4 b) | 2 % |" in text  # the sweep table: levels with bits, read noise in %
    assert "Not drawn" not in text


def test_compare_without_traces_or_devices_says_what_is_missing(tmp_path):
    train(TrainConfig(**SMALL), tmp_path / "a", progress=False)
    text = compare([tmp_path / "a"], tmp_path / "rep").read_text()
    assert "Not drawn: needs a run with a trace (`--trace-every N`)" in text
    assert "Not drawn: needs a hardware run (`--device`)" in text
    assert "No ideal run among the inputs" not in text


def test_compare_rejects_a_folder_that_is_no_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a run folder"):
        compare([tmp_path / "empty"], tmp_path / "rep")

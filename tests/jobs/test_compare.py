"""compare: a report with its plots from two tiny runs (one on a device, traced) and a sweep;
labels by what differs; plots whose text and legends do not collide; notes for missing data."""

import itertools
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


@pytest.mark.slow
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
    # each run is labelled by what differs between the two: the card and its override, lr, and the
    # estimator (the default resolves per card: one-sided on exact weights, symmetric on noisy reads)
    assert "| pcm estimator=symmetric lr=0.02 levels=16 | pcm | completed | 2 |" in text
    assert "| ideal (float) estimator=one-sided lr=0.001 | none (float) | completed | 2 |" in text
    assert "| 16 (4 b) | 2 % |" in text  # the sweep table: levels with bits, read noise in %
    assert "± 0.00" not in text  # one seed per cell: no spread to show
    assert "Not drawn" not in text


@pytest.mark.slow
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


@pytest.fixture
def figures(monkeypatch):
    """The figures compare() saves, by name, still open for inspection."""
    import mep_hw.jobs.compare as C

    saved = {}
    real = C._save

    def keep(fig, out, name, pdf, **kw):
        saved[name] = fig
        return real(fig, out, name, pdf, **kw)

    monkeypatch.setattr(C, "_save", keep)
    return saved


def _renderer(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return FigureCanvasAgg(fig).get_renderer()  # the figure was closed after saving; its layout stays


def _boxes(artists, renderer):
    return [a.get_window_extent(renderer) for a in artists if a.get_visible() and a.get_text().strip()]


def _no_overlap(boxes, what):
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (what, a, b)


@pytest.mark.slow
def test_runs_are_labelled_by_what_differs_and_a_diverged_run_by_its_status(tmp_path):
    from mep_hw.errors import DivergedError

    train(TrainConfig(**SMALL), tmp_path / "a", progress=False)
    train(TrainConfig(**SMALL, lr=0.01), tmp_path / "b", progress=False)
    with pytest.raises(DivergedError):
        train(TrainConfig(**SMALL, lr=1e6), tmp_path / "c", progress=False)
    text = compare([tmp_path / "a", tmp_path / "b", tmp_path / "c"], tmp_path / "rep").read_text()
    assert "| ideal (float) lr=0.001 | none (float) | completed | 2 |" in text
    assert "| ideal (float) lr=0.01 | none (float) | completed | 2 |" in text
    assert "| ideal (float) lr=1e+06 | none (float) | diverged | 0 | — |" in text


@pytest.mark.slow
def test_plot_text_does_not_collide_with_long_labels_and_many_runs(tmp_path, figures):
    long = dict(lr=0.02, beta=0.3, set={"levels": 16, "read_noise": 0.02, "dac_bits": 6, "adc_bits": 6})
    runs = []
    for name, opts in (("p1", dict(lr=0.01, set={"levels": 16})), ("p2", long), ("p3", dict(long, seed=1))):
        train(TrainConfig(**{**SMALL, "epochs": 1}, device="pcm", trace_every="2", **opts), tmp_path / name, progress=False)
        runs.append(tmp_path / name)
    compare(runs, tmp_path / "rep")
    fig = figures["pulses"]
    r = _renderer(fig)
    bars_ax = fig.axes[0]
    _no_overlap(_boxes(bars_ax.get_xticklabels(), r), "pulses tick labels")
    _no_overlap(_boxes(bars_ax.texts, r), "run names under the bars")
    legend = bars_ax.get_legend().get_window_extent(r)
    for patch in bars_ax.patches:
        if patch.get_height() == patch.get_height() and patch.get_height() > 0:  # a drawn bar
            assert not legend.overlaps(patch.get_window_extent(r)), "the legend covers a bar"
    for name in ("weights_over_training", "weights_vs_conductances", "pulses"):
        fig = figures[name]
        r = _renderer(fig)
        titles = [ax.title for ax in fig.axes]
        whole = fig.bbox
        for t in _boxes(titles, r):  # inside the figure: not clipped
            assert whole.x0 - 1 <= t.x0 and t.x1 <= whole.x1 + 1 and t.y1 <= whole.y1 + 1, (name, t)
        _no_overlap(_boxes(titles, r), f"{name} titles")


@pytest.mark.slow
def test_a_sweep_where_no_point_completed_says_so(tmp_path, figures):
    spec = tmp_path / "s.toml"
    spec.write_text('[base]\ndataset = "digits"\nlayers = "64,12,10"\nepochs = 1\nlimit_train = 100\nlimit_test = 50\n'
                    'solver = "euler"\ndt = 50.0\n[axes]\nmax_steps = [10, 20]\nnudged_max_steps = [5, 10]\n')  # Euler at dt 50 cycles
    run_sweep(spec, tmp_path / "sweep", workers=2, threads=1, progress=False)
    text = compare([tmp_path / "sweep"], tmp_path / "rep").read_text()
    assert "| 10 | 5 | no point completed | 0 |" in text and "not_settling — not settling" in text
    for name in ("sweep_sweep_heatmap", "sweep_sweep_lines"):
        notes = [t.get_text() for ax in figures[name].axes for t in ax.texts]
        assert any(t.startswith("no data: no point of this sweep completed") for t in notes), name

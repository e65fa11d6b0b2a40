"""Compare hardware-faithful runs against ideal runs, and summarise sweeps: Markdown + PNG plots.

``compare(inputs, out)`` reads run folders (``metrics.json``, ``config.toml``, optional
``trace.h5``) and sweep folders (``results.csv`` and one run folder per point) and writes
``out/report.md`` with these plots (each skipped, with a line in the report saying why, when its
data is absent):

* ``curves.png`` — test accuracy and training loss per epoch, every run; ideal runs dashed;
* ``sweep_<name>_heatmap.png`` / ``sweep_<name>_lines.png`` — final accuracy over the sweep's
  axes: mean over seeds in a heat map of the first two axes, and lines with ±1 std error bars;
* ``weights_vs_conductances.png`` — histograms of the logical weights and of the physical state
  (G⁺ and G⁻ in µS, MZI phases, fixed-point integers) of the first layer at the end of training;
* ``weights_over_training.png`` — quantiles and a few cells of the first layer's weights at every
  traced interval;
* ``settle_steps.png`` — mean free and nudged settle steps per epoch;
* ``pulses.png`` — programming pulses (up, down, refreshes) per layer, and per epoch.
"""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mep_hw.errors import ConfigError, MepHwError
from mep_hw.io.runs import atomic_write_bytes, ensure_dir, read_json, read_toml, storage_error
from mep_hw.io.trace import read_trace
from mep_hw.jobs.sweep import RESULTS_FILE, read_results

__all__ = ["compare", "RunInfo", "load_run"]

IDEAL_STYLE = {"color": "black", "linestyle": "--", "linewidth": 2.0}


class RunInfo(NamedTuple):
    path: Path
    label: str
    metrics: dict
    config: dict
    device: str | None  # card name; None for ideal weights
    trace: Path | None

    @property
    def ideal(self) -> bool:
        return self.device in (None, "ideal")


#: options that do not change what a run computes: never part of a label
_NOT_IN_LABEL = {"device", "set", "data_dir", "trace_every", "eval_batch_size"}


def _flat(config: dict) -> dict[str, Any]:
    """A run's options with the card overrides as "set.FIELD" keys."""
    out = {k: v for k, v in config.items() if k not in _NOT_IN_LABEL}
    for k, v in (config.get("set") or {}).items():
        out[f"set.{k}"] = v
    return out


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def _label(config: dict, differ: list[str] | None = None) -> str:
    """The device (or "ideal (float)") and the options listed in ``differ`` that this run sets:
    what tells it apart from the runs it is compared with. ``differ`` None: its card overrides."""
    dev = config.get("device")
    head = Path(dev).stem if dev else "ideal (float)"
    flat = _flat(config)
    keys = [k for k in flat if k.startswith("set.")] if differ is None else [k for k in differ if k in flat]
    extra = " ".join(f"{k.removeprefix('set.')}={_value(flat[k])}" for k in keys)
    return f"{head}{' ' + extra if extra else ''}"


def _differing(configs: list[dict]) -> list[str]:
    """The options (card overrides as set.FIELD) whose values are not the same in every config,
    in a stable order; an option a config lacks counts as its default (None)."""
    flats = [_flat(c) for c in configs]
    keys = sorted({k for f in flats for k in f}, key=lambda k: (k.startswith("set."), k))
    return [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]


def load_run(path: Path) -> RunInfo:
    m = read_json(path / "metrics.json")
    cfg = read_toml(path / "config.toml") if (path / "config.toml").exists() else m.get("config", {})
    trace = path / "trace.h5"
    dev = cfg.get("device")
    return RunInfo(path, _label(cfg), m, cfg, Path(dev).stem if dev else None, trace if trace.exists() else None)


class Sweep(NamedTuple):
    path: Path
    name: str
    rows: list[dict[str, str]]
    axes: list[str]


def _load_inputs(inputs: list[Path]) -> tuple[list[RunInfo], list[Sweep]]:
    runs, sweeps = [], []
    for p in inputs:
        if (p / RESULTS_FILE).exists():
            rows = read_results(p)
            fixed = {"point", "status", "test_accuracy", "wall_seconds", "epochs_completed", "run_dir", "error"}
            axes = [c for c in (rows[0].keys() if rows else []) if c not in fixed]
            sweeps.append(Sweep(p, p.name or str(p), rows, axes))
        elif (p / "metrics.json").exists():
            runs.append(load_run(p))
        else:
            raise ConfigError(f"{p} is neither a run folder (metrics.json) nor a sweep folder ({RESULTS_FILE}); check the path")
    if len(runs) > 1:  # label each run by what differs between the runs compared
        differ = _differing([r.config for r in runs])
        runs = [r._replace(label=_label(r.config, differ)) for r in runs]
    labels = [r.label for r in runs]
    runs = [r._replace(label=f"{r.label} ({r.path.name})") if labels.count(r.label) > 1 else r for r in runs]
    return runs, sweeps


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str, pdf: bool, legend_rows: int = 0) -> str:
    # a run legend (see _run_legend) sits in a band of that many rows under the axes
    fig.tight_layout(rect=(0, min(0.5, (0.15 + 0.22 * legend_rows) / fig.get_figheight()) if legend_rows else 0, 1, 1))
    fig.savefig(out / f"{name}.png", dpi=120)
    if pdf:
        fig.savefig(out / f"{name}.pdf")
    _plt().close(fig)
    return f"{name}.png"


def _run_legend(fig, ax) -> int:
    """The legend of ``ax``'s runs under the figure, where it covers no data; returns its rows."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return 0
    ncol = 1 if max(len(t) for t in labels) > 60 else min(len(labels), 3 if max(len(t) for t in labels) > 30 else 4)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    return -(-len(labels) // ncol)


def _style(run: RunInfo) -> dict:
    return dict(IDEAL_STYLE) if run.ideal else {"linewidth": 1.5}


# ---------------------------------------------------------------------------------------- plots
def _epoch_panels(runs: list[RunInfo], out: Path, pdf: bool, name: str, panels) -> str | None:
    """One figure, a panel per (history value, y label, title, y scale), a line per run over epochs;
    ideal runs black and dashed."""
    if not runs:
        return None
    plt = _plt()
    fig, axs = plt.subplots(1, len(panels), figsize=(11, 4.2))
    for r in runs:
        h = r.metrics.get("history", [])
        ep = [x["epoch"] for x in h]
        for ax, (value, *_rest) in zip(axs, panels):
            ax.plot(ep, [value(x) for x in h], marker="o", label=r.label, **_style(r))
    for ax, (_v, ylabel, title, yscale) in zip(axs, panels):
        ax.set(xlabel="epoch", ylabel=ylabel, title=title, yscale=yscale)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, out, name, pdf, legend_rows=_run_legend(fig, axs[0]))


def plot_curves(runs: list[RunInfo], out: Path, pdf: bool) -> str | None:
    return _epoch_panels(runs, out, pdf, "curves", [
        (lambda x: 100 * x["test_accuracy"], "test accuracy (%)", "Test accuracy: hardware vs ideal (dashed)", "linear"),
        (lambda x: x["train_loss"], "training loss (cost at the free state)", "Training loss", "log"),
    ])


def _num(v: str):
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v else f


def _axis_label(axis: str) -> str:
    names = {"set.levels": "conductance levels (bits)", "set.read_noise": "read noise (σ / conductance range)",
             "set.weight_bits": "weight word length (bits)", "set.prog_noise": "programming noise",
             "set.dac_bits": "DAC bits", "set.adc_bits": "ADC bits", "seed": "seed"}
    return names.get(axis, axis.removeprefix("set."))


def _tick(axis: str, v) -> str:
    if axis == "set.levels" and isinstance(v, (int, float)) and v >= 2:
        return f"{v:g} ({math.log2(v):.3g} b)"
    if axis == "set.read_noise" and isinstance(v, (int, float)):
        return f"{100 * v:g} %"
    return f"{v:g}" if isinstance(v, float) else str(v)


def sweep_table(sw: Sweep) -> tuple[list[str], dict[tuple, list[float]], list[dict]]:
    """(axes other than seed, {axis values: [accuracies over seeds]}, failed rows)."""
    axes = []
    for a in (a for a in sw.axes if a != "seed"):
        # a [zip] partner of an axis already kept (one value of it per value of that one) adds nothing to plot
        if not any(len({(r[k], r[a]) for r in sw.rows}) == len({r[k] for r in sw.rows}) == len({r[a] for r in sw.rows}) for k in axes):
            axes.append(a)
    acc: dict[tuple, list[float]] = defaultdict(list)
    failed = []
    for r in sw.rows:
        key = tuple(_num(r[a]) for a in axes)
        if r["status"] == "completed" and r["test_accuracy"]:
            acc[key].append(100 * float(r["test_accuracy"]))
        else:
            acc.setdefault(key, [])
            failed.append(r)
    return axes, dict(acc), failed


def plot_sweep(sw: Sweep, out: Path, pdf: bool) -> list[tuple[str, str]]:
    plt = _plt()
    axes, acc, _ = sweep_table(sw)
    made = []
    if not axes:
        return made
    vals = [sorted({k[i] for k in acc}, key=lambda v: (isinstance(v, str), v)) for i in range(len(axes))]
    nseeds = max((len(v) for v in acc.values()), default=0)
    seeds = f"mean of {nseeds} seed(s)" if nseeds else "no completed point"
    tag = sw.name.replace(" ", "_")
    if len(axes) >= 2:
        rest = "" if len(axes) == 2 else f", averaged over {', '.join(axes[2:])}"
        grid = np.full((len(vals[1]), len(vals[0])), math.nan)
        for i, v0 in enumerate(vals[0]):
            for j, v1 in enumerate(vals[1]):
                got = [a for k, a_list in acc.items() if k[0] == v0 and k[1] == v1 for a in a_list]
                grid[j, i] = np.mean(got) if got else math.nan
        fig, ax = plt.subplots(figsize=(1.3 * len(vals[0]) + 3, 0.8 * len(vals[1]) + 2.5))
        finite = grid[np.isfinite(grid)]
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", origin="lower", aspect="auto",
                       vmin=float(finite.min()) if finite.size else 0, vmax=float(finite.max()) if finite.size else 100)
        for i in range(len(vals[0])):
            for j in range(len(vals[1])):
                txt = "failed" if not math.isfinite(grid[j, i]) else f"{grid[j, i]:.1f}"
                ax.text(i, j, txt, ha="center", va="center", color="white" if not math.isfinite(grid[j, i]) or grid[j, i] < np.nanmean(grid) else "black", fontsize=9)
        ax.set_xticks(range(len(vals[0])), [_tick(axes[0], v) for v in vals[0]])
        ax.set_yticks(range(len(vals[1])), [_tick(axes[1], v) for v in vals[1]])
        ax.set(xlabel=_axis_label(axes[0]), ylabel=_axis_label(axes[1]),
               title=f"{sw.name}: test accuracy (%), {seeds}{rest}")
        fig.colorbar(im, ax=ax, label="test accuracy (%)")
        if not finite.size:
            _no_data(ax)
        made.append((_save(fig, out, f"sweep_{tag}_heatmap", pdf), f"Mean final test accuracy over {_axis_label(axes[0])} × {_axis_label(axes[1])}{rest}."))
    fig, ax = plt.subplots(figsize=(8, 5))
    x = vals[0]
    xpos = list(range(len(x)))
    groups = vals[1] if len(axes) >= 2 else [None]
    for gi, g in enumerate(groups):
        shift = 0.06 * (gi - (len(groups) - 1) / 2)  # keep the error bars of the lines apart
        ys, es = [], []
        for v in x:
            got = [a for k, lst in acc.items() if k[0] == v and (g is None or k[1] == g) for a in lst]
            ys.append(np.mean(got) if got else math.nan)
            es.append(np.std(got) if len(got) > 1 else 0.0)
        lab = None if g is None else f"{_axis_label(axes[1])} = {_tick(axes[1], g)}"
        ax.errorbar([x + shift for x in xpos], ys, yerr=es, marker="o", capsize=3, label=lab)
    ax.set_xticks(xpos, [_tick(axes[0], v) for v in x])
    ax.set(xlabel=_axis_label(axes[0]), ylabel="test accuracy (%)",
           title=f"{sw.name}: accuracy vs {_axis_label(axes[0])}\n({f'mean ± std over {nseeds} seed(s)' if nseeds else 'no completed point'})")
    ax.grid(alpha=0.3)
    if not any(acc.values()):
        ax.set_ylim(0, 100)
        _no_data(ax)
    elif len(axes) >= 2:
        ax.legend(fontsize=8)
    made.append((_save(fig, out, f"sweep_{tag}_lines", pdf), f"Final test accuracy vs {_axis_label(axes[0])}; error bars: ±1 std over seeds."))
    return made


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data: no point of this sweep completed\n(the report lists each point's status and error)",
            transform=ax.transAxes, ha="center", va="center", fontsize=11,
            bbox={"facecolor": "white", "edgecolor": "0.5", "alpha": 0.9})


def _title(text: str, width: int = 48) -> str:
    """A plot title wrapped to lines of ``width`` characters (long run labels are not clipped)."""
    return "\n".join(textwrap.wrap(text, width)) or text


def _last_layer0(run: RunInfo) -> dict[str, tuple[np.ndarray, str]] | None:
    if run.trace is None:
        return None
    t = read_trace(run.trace)
    out = {}
    for name, arr in t.intervals.items():
        if name.startswith("layers/W0/") and arr.ndim >= 2:
            out[name.split("/")[-1]] = (arr, t.units[f"intervals/{name}"])
    return out or None


def plot_weights_vs_physical(runs: list[RunInfo], out: Path, pdf: bool) -> str | None:
    hw = [(r, _last_layer0(r)) for r in runs if not r.ideal and r.trace is not None]
    hw = [(r, d) for r, d in hw if d is not None and len(d) > 2]
    if not hw:
        return None
    plt = _plt()
    ncol = max(len(d) - 1 for _, d in hw)  # weight, physical…, minus bias
    fig, axs = plt.subplots(len(hw), ncol, figsize=(3.6 * ncol, 3.0 * len(hw)), squeeze=False)
    for i, (r, d) in enumerate(hw):
        names = ["weight"] + [k for k in d if k not in ("weight", "bias")]
        for j, name in enumerate(names[:ncol]):
            arr, units = d[name]
            ax = axs[i, j]
            ax.hist(arr[-1].ravel(), bins=80, color="tab:blue" if name == "weight" else "tab:orange")
            unit = "" if units in ("1", "") else f" ({units.replace('uS', 'µS')})"
            ax.set(xlabel=f"{'logical weight' if name == 'weight' else name}{unit}", ylabel="cells" if j == 0 else None,
                   yscale="log")
            ax.set_title(_title(f"{r.label}: W0 {name}", 34), fontsize=9)
        for j in range(len(names), ncol):
            axs[i, j].axis("off")
    return _save(fig, out, "weights_vs_conductances", pdf)


def plot_weights_over_training(runs: list[RunInfo], out: Path, pdf: bool) -> str | None:
    traced = [r for r in runs if r.trace is not None]
    if not traced:
        return None
    plt = _plt()
    fig, axs = plt.subplots(len(traced), 2, figsize=(11, 3.7 * len(traced)), squeeze=False)
    for i, r in enumerate(traced):
        t = read_trace(r.trace)
        steps = t.intervals["step"]
        w = t.intervals["layers/W0/weight"].reshape(len(steps), -1)
        q = np.percentile(w, [5, 25, 50, 75, 95], axis=1)
        ax = axs[i, 0]
        ax.fill_between(steps, q[0], q[4], alpha=0.2, label="5–95 %")
        ax.fill_between(steps, q[1], q[3], alpha=0.4, label="25–75 %")
        ax.plot(steps, q[2], color="k", linewidth=1, label="median")
        rng = np.random.default_rng(0)
        for c in rng.choice(w.shape[1], size=min(5, w.shape[1]), replace=False):
            ax.plot(steps, w[:, c], linewidth=0.8)
        ax.set(xlabel="optimizer step", ylabel="W0 weight")
        ax.set_title(_title(f"{r.label}: W0 quantiles and 5 cells"), fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
        ax = axs[i, 1]
        k = 0
        while f"layers/W{k}/weight" in t.intervals:
            wk = t.intervals[f"layers/W{k}/weight"].reshape(len(steps), -1)
            ax.plot(steps, np.abs(wk).mean(1), marker=".", label=f"W{k}")
            k += 1
        ax.set(xlabel="optimizer step", ylabel="mean |W|")
        ax.set_title(_title(f"{r.label}: mean |weight| per layer"), fontsize=10)
        ax.legend(fontsize=8)
        for a in axs[i]:
            a.grid(alpha=0.3)
    return _save(fig, out, "weights_over_training", pdf)


def plot_settle_steps(runs: list[RunInfo], out: Path, pdf: bool) -> str | None:
    return _epoch_panels(runs, out, pdf, "settle_steps", [
        (lambda x: x["free_steps_mean"], "steps per sample", "Free phase: mean settle steps", "linear"),
        (lambda x: x["nudged_steps_mean"], "steps per sample and phase", "Nudged phases: mean settle steps", "linear"),
    ])


def plot_pulses(runs: list[RunInfo], out: Path, pdf: bool) -> str | None:
    hw = [r for r in runs if r.metrics.get("pulses")]
    if not hw:
        return None
    plt = _plt()
    bars, labels, groups = [], [], []  # groups: (first bar, last bar, run label)
    for r in hw:
        first = len(labels)
        for layer in r.metrics["pulses"]:
            bars.append([layer["pulses_up"], layer["pulses_down"], layer["refreshes"]])
            labels.append(f"{layer['layer']}\n{layer['shape'][0]}×{layer['shape'][1]}")
        groups.append((first, len(labels) - 1, r.label))
    bars = np.array(bars, dtype=float)
    x = np.arange(len(labels), dtype=float)
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(12.0, 6.0 + 1.1 * len(labels)), 4.8),
                               gridspec_kw={"width_ratios": [max(1.0, len(labels) / 4), 1.0]})
    for k, (name, color) in enumerate((("up (potentiating)", "tab:green"), ("down (depressing)", "tab:red"), ("refreshes", "tab:gray"))):
        pos = x + (k - 1) * 0.27
        a.bar(pos, np.where(bars[:, k] > 0, bars[:, k], np.nan), width=0.27, label=name, color=color)
        for xi in pos[bars[:, k] == 0]:  # log axis: a zero gets a label, not a bar
            a.text(xi, 1.0, "0", ha="center", va="bottom", fontsize=8, color=color)
    a.set_xticks(x, labels, fontsize=8)
    a.set(ylabel="pulses (whole run)", yscale="log", ylim=(0.8, None), xlim=(-0.6, len(labels) - 0.4))
    a.set_title("Programming pulses per layer", pad=26)
    for i, (lo, hi, lab) in enumerate(groups):  # the run under its layers, runs parted by a line
        a.annotate(_title(lab, max(14, 12 * (hi - lo + 1))), xy=((lo + hi) / 2, 0), xycoords=("data", "axes fraction"),
                   xytext=(0, -30), textcoords="offset points", ha="center", va="top", fontsize=8)
        if i:
            a.axvline(lo - 0.5, color="0.6", linewidth=0.8)
    # above the bars, outside the axes: the legend never covers one
    a.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    for r in hw:
        h = r.metrics.get("history", [])
        b.plot([x["epoch"] for x in h], [x.get("pulses_up", 0) + x.get("pulses_down", 0) for x in h], marker="o", label=r.label)
    b.set(xlabel="epoch", ylabel="pulses in the epoch (up + down)", yscale="log", title="Pulses per epoch")
    b.grid(alpha=0.3)
    b.xaxis.get_major_locator().set_params(integer=True)
    b.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    return _save(fig, out, "pulses", pdf)


# ---------------------------------------------------------------------------------------- report
def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{100 * v:.2f}" if pct else (f"{v:.3g}" if isinstance(v, float) else str(v))


def compare(inputs: list[Path], out: Path, *, pdf: bool = False) -> Path:
    """Write ``out/report.md`` and its plots; returns the report's path."""
    if not inputs:
        raise ConfigError("compare needs at least one run or sweep folder")
    runs, sweeps = _load_inputs([Path(p) for p in inputs])
    out = ensure_dir(out)
    try:
        return _report(inputs, runs, sweeps, out, pdf)
    except OSError as e:  # a plot that cannot be written (full disk, read-only folder)
        raise storage_error(e, e.filename or out) from None


def _report(inputs, runs: list[RunInfo], sweeps: list[Sweep], out: Path, pdf: bool) -> Path:
    md = ["# mep_hw comparison report", ""]
    md.append("Inputs: " + ", ".join(f"`{p}`" for p in inputs) + ".")
    md.append("")
    ideal = [r for r in runs if r.ideal]
    if runs:
        md += ["## Runs", "", "| run | device | status | epochs | final test accuracy (%) | gap to ideal (points) | train time (s) | pulses up/down |",
               "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            m = r.metrics
            acc = m.get("test_accuracy")
            ref = [i for i in ideal if i.config.get("dataset") == r.config.get("dataset") and i.metrics.get("epochs_completed") == m.get("epochs_completed")]
            ref.sort(key=lambda i: len(_differing([i.config, r.config])))  # the ideal run most like this one
            gap = "—" if (r.ideal or not ref or acc is None) else f"{100 * (ref[0].metrics['test_accuracy'] - acc):+.2f}"
            wall = sum(h.get("epoch_seconds", 0.0) for h in m.get("history", []))
            pul = m.get("pulses") or []
            pulses = f"{sum(p['pulses_up'] for p in pul):.3g} / {sum(p['pulses_down'] for p in pul):.3g}" if pul else "—"
            md.append(f"| {r.label} | {r.device or 'none (float)'} | {m.get('status', '?')} | {m.get('epochs_completed')} | {_fmt(acc, True)} | {gap} | {wall:.1f} | {pulses} |")
        md.append("")
        if not ideal:
            md += ["No ideal run among the inputs: add one (a run without `--device`) to see the gap.", ""]
    plots = [
        ("Accuracy and loss", plot_curves, "Test accuracy and training loss per epoch; ideal runs are black and dashed."),
        ("Weights vs conductances", plot_weights_vs_physical, "Histograms (log counts) of the first layer at the end of training: the logical weights the network used, and the device's physical state."),
        ("Weights over training", plot_weights_over_training, "Left: quantiles of the first layer's weights and five individual cells at every traced interval. Right: mean |W| per layer."),
        ("Settle steps", plot_settle_steps, "Mean solver steps per sample to reach the steady state, per epoch."),
        ("Pulse counts", plot_pulses, "Programming pulses per layer over the whole run (log scale), and per epoch."),
    ]
    if not runs:
        plots = []
        md += ["No run folders among the inputs: add runs (e.g. a hardware run with `--trace-every` and an ideal run) "
               "for accuracy curves, weight and conductance histograms, settle steps and pulse counts.", ""]
    for title, fn, caption in plots:
        md += [f"## {title}", ""]
        try:
            png = fn(runs, out, pdf)
        except MepHwError as e:
            png, caption = None, f"Not drawn: {e}"
        if png:
            md += [f"![{title}]({png})", "", caption, ""]
        else:
            why = {"Weights vs conductances": "needs a hardware run with a trace (`--device … --trace-every N`)",
                   "Weights over training": "needs a run with a trace (`--trace-every N`)",
                   "Pulse counts": "needs a hardware run (`--device`)"}.get(title, "needs at least one run folder")
            md += [f"Not drawn: {why}.", ""]
    for sw in sweeps:
        axes, acc, failed = sweep_table(sw)
        md += [f"## Sweep `{sw.name}`", "", f"{len(sw.rows)} points; axes: {', '.join(sw.axes)}.", ""]
        if axes:
            md += ["| " + " | ".join(_axis_label(a) for a in axes) + " | test accuracy (%) mean ± std | seeds |",
                   "|" + "---|" * (len(axes) + 2)]
            for k in sorted(acc, key=lambda k: tuple((isinstance(v, str), v) for v in k)):
                v = acc[k]  # one seed has no spread to show
                cell = (f"{np.mean(v):.2f} ± {np.std(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}") if v else "no point completed"
                md.append("| " + " | ".join(_tick(a, x) for a, x in zip(axes, k)) + f" | {cell} | {len(v)} |")
            md.append("")
        for png, caption in plot_sweep(sw, out, pdf):
            md += [f"![{caption}]({png})", "", caption, ""]
        if failed:
            md += [f"{len(failed)} point(s) did not complete:", ""]
            md += [f"- point {r['point']} ({', '.join(f'{a}={r[a]}' for a in sw.axes)}): {r['status']} — {r['error'][:200]}" for r in failed]
            md.append("")
    report = out / "report.md"
    atomic_write_bytes(report, ("\n".join(md) + "\n").encode())
    return report

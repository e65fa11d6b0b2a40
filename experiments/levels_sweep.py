"""Accuracy vs number of device states: EP (host, analog, tiki-taka) and backprop (analog).

The EP counterpart of the analog-training literature's accuracy-vs-states curves (Gokmen &
Vlasov 2016, Fig. 4; Agarwal et al. 2016): the FeFET card with its pulse nonlinearity and its
cycle-to-cycle and device-to-device spread switched off, so its pulses are linear, noiseless and
symmetric and the number of pulse positions across the range (``levels``) sets the step
(dw_pulse = 2/(levels − 1) of the weight range); the card's read path is kept (1 % programming
noise, 0.5 % read noise, 8-bit DAC and ADC). MNIST 784-500-10.

    python experiments/levels_sweep.py --data-dir ../shared/data/mnist --limit-train 3000 \\
        --limit-test 1000 --epochs 2 --out benchmarks/results/levels_sweep.json --plot docs/img/levels_sweep.png

``--family ecram``: the same sweep on the ECRAM card (asymmetric linear-step pulses with their
cycle-to-cycle and device-to-device spread, the card's read path), its nominal step set to
dw_min = R/(levels − 1), so Tiki-Taka has the asymmetry it needs; every run applies long pulse
sequences by their moments, and Tiki-Taka uses the transfer settings of
docs/learning-in-array.md (:data:`TT_ECRAM`).

    python experiments/levels_sweep.py --family ecram --data-dir ../shared/data/mnist --limit-train 3000 \\
        --limit-test 1000 --epochs 2 --out benchmarks/results/levels_sweep_ecram.json --plot docs/img/levels_sweep_ecram.png

The JSON is rewritten after every run; runs already in it are skipped (an interrupted sweep
resumes). The plot is drawn from the JSON (``--plot-only`` redraws it without running).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mep_hw.benchmarks.in_array import LR, _parse_run, run_one
from mep_hw.io import load_dataset
from mep_hw.io.runs import read_json, write_json

CARD = "fefet"
LINEAR = {"nl_ltp": 0.0, "nl_ltd": 0.0, "dw_ctoc": 0.0, "dw_dtod": 0.0, "g_dtod": 0.0}
# the ECRAM family: Tiki-Taka's transfer settings (fast array at lr 2, every column every step, the
# transfer rate 0.1 following the schedule: the best of docs/learning-in-array.md's study)
TT_ECRAM = {"transfer_fast_lr": 2.0, "transfer_lr": 0.1, "transfer_columns": 784, "transfer_max_pulses": 10, "pulse_bl": 255}


def family_setup(family: str, levels: int, update: str) -> tuple[str, dict]:
    """(card, extra TrainConfig fields) of one sweep point."""
    if family == "fefet":
        return CARD, {"set": {**LINEAR, "levels": levels}}
    from mep_hw.hw import load_card

    dev = load_card("ecram").device
    extra = {"set": {"dw_min_uS": (dev.g_max_uS - dev.g_min_uS) / (levels - 1)}, "pulse_application": "moments"}
    if update == "tiki-taka":
        extra.update(TT_ECRAM)
    return "ecram", extra


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    by_run: dict[str, list[tuple[int, float]]] = {}
    for key, r in report["runs"].items():
        run, _, lv = key.partition("/levels=")
        by_run.setdefault(run, []).append((int(lv), 100 * r["test_accuracy"]))
    for run, pts in sorted(by_run.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=run)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("device states (nominal steps across the range + 1)")
    ax.set_ylabel("test accuracy (%)")
    n = report.get("limit_train") or 60000
    ax.set_title(f"MNIST 784-500-10, {report.get('card')} pulses, {n} training images, {report.get('epochs')} epochs", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--family", default="fefet", choices=["fefet", "ecram"],
                   help="fefet: linear, noiseless, symmetric pulses (Tiki-Taka resets its fast array: no leak); ecram: the ECRAM card's asymmetric pulses")
    p.add_argument("--levels", type=int, nargs="+", default=[4, 16, 64, 256, 1024])
    p.add_argument("--runs", nargs="+", default=["ep:host", "ep:analog", "ep:tiki-taka", "backprop:analog"])
    p.add_argument("--limit-train", type=int, default=3000)
    p.add_argument("--limit-test", type=int, default=1000)
    p.add_argument("--pulse-sampling", default="marginal", choices=["exact", "marginal"])
    p.add_argument("--out", default="benchmarks/results/levels_sweep.json")
    p.add_argument("--plot", default="docs/img/levels_sweep.png")
    p.add_argument("--plot-only", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    first = {"benchmark": "levels_sweep", "card": CARD, "overrides": LINEAR, "runs": {}}
    if a.family == "ecram":
        first.update(card="ecram", overrides="dw_min_uS = R/(levels - 1)", tiki_taka=TT_ECRAM)
    report = read_json(out) if out.exists() else first
    if not a.plot_only:
        report.update(epochs=a.epochs, limit_train=a.limit_train, limit_test=a.limit_test, pulse_sampling=a.pulse_sampling)
        ds = load_dataset("mnist", a.data_dir, limit_train=a.limit_train, limit_test=a.limit_test)
        for levels in a.levels:
            for name in a.runs:
                method, update = _parse_run(name)
                key = f"{name}/levels={levels}"
                if key in report["runs"]:
                    continue
                card, extra = family_setup(a.family, levels, update)
                if update != "host":
                    extra["pulse_sampling"] = a.pulse_sampling
                r = run_one(card, method, update, data_dir=a.data_dir, epochs=a.epochs, lr=LR[(method, update)], ds=ds,
                            extra=extra)
                report["runs"][key] = r
                write_json(out, report)
                print(f"{key}: test accuracy {r['test_accuracy']:.4f} ({r['wall_seconds']:.0f} s)", flush=True)
    plot(report, Path(a.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

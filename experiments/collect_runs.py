"""Collect finished ``mep-hw train`` run folders into one JSON table (for studies run point by point).

    python experiments/collect_runs.py RUN_DIR [RUN_DIR …] --out benchmarks/results/STUDY.json

Per run: its label (the folder name), the options that differ from the ``TrainConfig`` defaults,
status, final and best test accuracy, and per epoch the test and train accuracy, the mean settle
steps per sample of the free and nudged phases and the epoch time, and for hardware runs the
training energy, pulses and host FLOPs per sample and the remaps per layer, all read from the
run's ``metrics.json`` (nothing is recomputed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mep_hw.io.runs import write_json
from mep_hw.train import TrainConfig


def collect(run_dir: Path) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    cfg = m["config"]
    defaults = TrainConfig().to_dict()
    changed = {k: v for k, v in cfg.items() if k not in ("out", "data_dir") and defaults.get(k) != v}
    h = m["history"]
    per = lambda key, nd=4: [None if e.get(key) is None else round(e[key], nd) for e in h]  # noqa: E731
    return {
        "label": run_dir.name, "options": changed, "status": m["status"], "epochs": m["epochs_completed"],
        "test_accuracy": h[-1]["test_accuracy"] if h else None,
        "best_test_accuracy": max(e["test_accuracy"] for e in h) if h else None,
        "test_accuracy_history": per("test_accuracy"), "train_accuracy_history": per("train_accuracy"),
        "free_steps_mean": per("free_steps_mean", 3), "nudged_steps_mean": per("nudged_steps_mean", 3),
        "epoch_seconds": per("epoch_seconds", 1),
        **_hardware(m),
    }


def _hardware(m: dict) -> dict:
    train = (m.get("cost") or {}).get("train") or {}
    if not train:
        return {}
    per = train.get("per_sample", {})
    energy = train.get("energy_J_per_sample") or {}
    return {"energy_J_per_sample": energy.get("total"), "energy_split_J_per_sample": energy or None,
            "pulses_per_sample": per.get("pulses"), "host_flops_per_sample": per.get("host_flops"),
            "remaps": {l["layer"]: l.get("remaps", 0) for l in m.get("pulses", [])} or None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.json)")
    p.add_argument("--note", default="", help="how the runs were made (stored in the JSON)")
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    rows = [collect(r) for r in a.runs]
    write_json(a.out, {"study": a.out.stem, "note": a.note, "runs": rows})
    for r in rows:
        print(f"{r['label']:24s} {r['status']:10s} {r['epochs']:3d} ep  test {100 * r['test_accuracy']:.2f} % "
              f"(best {100 * r['best_test_accuracy']:.2f})  {r['options']}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

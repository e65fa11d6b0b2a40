"""Benchmark of the sweep runner: wall time of a sweep on the local pool, and the pool's speedup
over running the same points one after another, measured in one session on this machine.

    MEP_HW_DATA=../shared/data python -m mep_hw.benchmarks.sweeps run experiments/pcm_bits_noise.toml \\
        --out runs/pcm_bits_noise --json benchmarks/results/sweep_pcm_bits_noise.json
    MEP_HW_DATA=../shared/data python -m mep_hw.benchmarks.sweeps speedup experiments/pcm_bits_noise.toml \\
        --points 6 --json benchmarks/results/sweep_speedup.json

``run`` runs (or finishes) a sweep with the default local pool and records its wall time and the
mean ± std test accuracy of every cell (over seeds). ``speedup`` takes the first N points of a
sweep and runs them twice into fresh folders: one after another (1 worker with every core's
threads) and on the pool (one worker per core, one thread each); the figure is the ratio of the
two wall times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from mep_hw.io.runs import read_json, read_toml, write_json, write_toml
from mep_hw.jobs.sweep import expand, load_sweep, read_results, run_sweep


def _cells(rows: list[dict], axes: list[str]) -> list[dict]:
    acc = defaultdict(list)
    status = defaultdict(list)
    for r in rows:
        key = tuple(r[a] for a in axes if a != "seed")
        status[key].append(r["status"])
        if r["status"] == "completed" and r["test_accuracy"]:
            acc[key].append(float(r["test_accuracy"]))
    out = []
    for key in status:
        v = acc.get(key, [])
        out.append({**dict(zip([a for a in axes if a != "seed"], key)),
                    "test_accuracy_mean": statistics.fmean(v) if v else None,
                    "test_accuracy_std": statistics.pstdev(v) if len(v) > 1 else (0.0 if v else None),
                    "seeds": len(v), "statuses": status[key]})
    return out


def run(spec: Path, out: Path, json_out: Path, workers: int | None) -> dict:
    points = expand(load_sweep(spec))
    t0 = time.perf_counter()
    results = run_sweep(spec, out, workers=workers, progress=False)
    wall = time.perf_counter() - t0
    rows = read_results(out)
    axes = list(load_sweep(spec).axes) + list(load_sweep(spec).zipped)
    ran = [r for r in results.values() if r.status != "skipped"]
    prev = read_json(json_out) if json_out.exists() else {}
    report = {
        "benchmark": "sweep", "spec": str(spec), "points": len(points),
        "workers": workers or os.cpu_count(), "cores": os.cpu_count(),
        # a sweep finished over several sessions sums their wall times
        "wall_seconds": wall + (prev.get("wall_seconds", 0.0) if prev.get("spec") == str(spec) and len(ran) < len(points) else 0.0),
        "points_run_now": len(ran), "point_seconds_sum": sum(float(r["wall_seconds"] or 0) for r in rows),
        "statuses": {s: sum(1 for r in rows if r["status"] == s) for s in {r["status"] for r in rows}},
        "cells": _cells(rows, axes),
    }
    write_json(json_out, report)
    return report


def speedup(spec: Path, n_points: int, json_out: Path) -> dict:
    raw = read_toml(spec)
    pts = expand(load_sweep(spec))[:n_points]
    cores = os.cpu_count() or 1
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        sub = Path(tmp) / "subset.toml"
        # the first N points as their own sweep: a zip table of their axis values
        keys = list(pts[0].values)
        write_toml(sub, {"base": raw.get("base", {}), "zip": {k: [p.values[k] for p in pts] for k in keys}})
        for label, workers in (("sequential", 1), ("pool", cores)):
            out = Path(tmp) / label
            t0 = time.perf_counter()
            res = run_sweep(sub, out, workers=workers, progress=False)
            times[label] = time.perf_counter() - t0
            bad = [r for r in res.values() if r.status != "completed"]
            if bad:
                raise SystemExit(f"{label}: {len(bad)} point(s) did not complete: {bad[0].error}")
            shutil.rmtree(out)
    report = {"benchmark": "sweep_speedup", "spec": str(spec), "points": len(pts), "cores": cores,
              "sequential_seconds": times["sequential"], "pool_seconds": times["pool"],
              "speedup": times["sequential"] / times["pool"],
              "note": "sequential: 1 worker with all cores' torch threads; pool: one spawned worker per core, 1 thread each"}
    write_json(json_out, report)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("spec")
    r.add_argument("--out", required=True)
    r.add_argument("--workers", type=int, default=None)
    r.add_argument("--json", required=True)
    s = sub.add_parser("speedup")
    s.add_argument("spec")
    s.add_argument("--points", type=int, default=6)
    s.add_argument("--json", required=True)
    a = p.parse_args(argv)
    if a.what == "run":
        rep = run(Path(a.spec), Path(a.out), Path(a.json), a.workers)
        print(f"{rep['points']} points in {rep['wall_seconds']:.0f} s ({rep['statuses']})")
    else:
        rep = speedup(Path(a.spec), a.points, Path(a.json))
        print(f"{rep['points']} points: sequential {rep['sequential_seconds']:.0f} s, pool {rep['pool_seconds']:.0f} s, speedup {rep['speedup']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

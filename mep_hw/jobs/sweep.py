"""Sweeps: one base run configuration, axes over train options and device-card fields.

A sweep file (TOML)::

    [base]                 # any `mep-hw train` option, by its long name (batch-size or batch_size)
    dataset = "mnist"
    layers = "784,500,10"
    epochs = 5
    device = "pcm"
    [axes]                 # the grid: each key a train option, or "set.FIELD" for a device-card field
    "set.levels" = [4, 8, 16, 64]
    "set.read_noise" = [0.0, 0.01, 0.02, 0.05]
    seed = [0, 1, 2]
    [zip]                  # optional: lists of equal length that vary together (one more grid axis)
    "set.weight_bits" = [8, 12, 16]
    "set.weight_frac" = [6, 10, 14]

The points are the Cartesian product of the ``[axes]`` lists and the ``[zip]`` group. Every
point's :class:`TrainConfig` (card and overrides included) is built before anything runs, so an
unknown option or card field, or a value out of range, fails the whole sweep at once; so does a
dataset that is neither in the data folder (``data_dir``: ``--data-dir``, else ``[base]``, else
``MEP_HW_DATA``) nor downloadable into the cache (it is downloaded once, before the points run).

Each point runs in its own folder ``DIR/points/NNNN-<values>-<hash>`` (the hash is of the point's
full configuration — where the data is excepted —, so editing the sweep never reuses a folder of
another configuration). A point whose folder holds a completed run is skipped; a partial one is
resumed; a point that diverges, stops settling or fails is recorded with its status
(``diverged``, ``not_settling``, ``failed``) and error and the sweep goes on (rerunning the
sweep retries it). Points run on a local process pool (``workers``, default: one per core, each
with cores/workers torch threads) or, with ``scheduler="tcp://HOST:PORT"``, on a Dask cluster
(each point one task, one torch thread). ``DIR/results.csv`` has one row per point — the axis
values, final test accuracy, status, wall time, error — and is rewritten after every point.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import multiprocessing
import os
import re
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, NamedTuple

from mep_hw.errors import ConfigError, DataError, DivergedError, MepHwError, SettleError
from mep_hw.io import DataAvailability, cache_dir, check_dataset, download_idx
from mep_hw.io.runs import atomic_write_bytes, ensure_dir, read_json, read_toml, write_json, write_toml
from mep_hw.train import TrainConfig, option_names

__all__ = ["SweepSpec", "SweepPoint", "PointResult", "load_sweep", "expand", "check_data", "run_sweep", "read_results",
           "RESULTS_FILE"]

RESULTS_FILE = "results.csv"
SPEC_FILE = "sweep.toml"
POINT_FILE = "point.json"  # in a point's run folder: its result, written when it completes


class SweepSpec(NamedTuple):
    base: dict[str, Any]
    axes: dict[str, list]  # grid axes, in file order
    zipped: dict[str, list]  # lists of one length that vary together
    source: str


class SweepPoint(NamedTuple):
    index: int
    name: str  # folder name under DIR/points
    values: dict[str, Any]  # axis key → value of this point
    config: TrainConfig


class PointResult(NamedTuple):
    status: str  # completed, diverged, not_settling, failed, skipped (completed before)
    test_accuracy: float | None
    wall_seconds: float
    epochs_completed: int
    error: str | None


def _option(key: str, source: str) -> str:
    name = key.strip().replace("-", "_")
    if name not in option_names():
        raise ConfigError(f"{source}: unknown option {key!r}; valid options: {', '.join(option_names())} and set.FIELD for card fields")
    if name == "set":
        raise ConfigError(f"{source}: give device-card fields one by one as \"set.FIELD\" (e.g. \"set.levels\")")
    return name


def _list(key: str, v, source: str) -> list:
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{source}: axis {key!r} must be a non-empty list of values, got {v!r}")
    return v


def load_sweep(path: str | Path, *, data_dir: str | Path | None = None) -> SweepSpec:
    """Read and check the shape of a sweep file (values are checked by :func:`expand`).
    ``data_dir`` (``--data-dir``) sets the data folder of every point, as an absolute path."""
    path = Path(path)
    raw = read_toml(path)
    src = str(path)
    unknown = sorted(set(raw) - {"base", "axes", "zip"})
    if unknown:
        raise ConfigError(f"{src}: unknown table(s) {unknown}; a sweep file has [base], [axes] and optionally [zip]")
    base_raw = raw.get("base", {})
    if not isinstance(base_raw, dict):
        raise ConfigError(f"{src}: [base] must be a table of train options")
    base: dict[str, Any] = {}
    for k, v in base_raw.items():
        if k == "set" and isinstance(v, dict):
            base["set"] = dict(v)
        elif k.startswith("set."):
            base.setdefault("set", {})[k[4:]] = v
        else:
            base[_option(k, src + " [base]")] = v
    tables = {}
    for t in ("axes", "zip"):
        tab = raw.get(t, {})
        if not isinstance(tab, dict):
            raise ConfigError(f"{src}: [{t}] must be a table of lists")
        tables[t] = {}
        for k, v in tab.items():
            key = k if k.startswith("set.") else _option(k, f"{src} [{t}]")
            if key.startswith("set.") and not key[4:]:
                raise ConfigError(f"{src} [{t}]: {k!r} names no card field; write \"set.FIELD\"")
            tables[t][key] = _list(k, v, f"{src} [{t}]")
    both = sorted(set(tables["axes"]) & set(tables["zip"]))
    if both:
        raise ConfigError(f"{src}: {both} appear in both [axes] and [zip]; keep each axis in one table")
    lengths = {k: len(v) for k, v in tables["zip"].items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"{src}: the [zip] lists must have one length, got {lengths}")
    if not tables["axes"] and not tables["zip"]:
        raise ConfigError(f"{src}: the sweep has no axes; add an [axes] table, e.g. seed = [0, 1, 2]")
    if "data_dir" in tables["axes"] or "data_dir" in tables["zip"]:
        raise ConfigError(f"{src}: data_dir is where the data is, not an axis; give it in [base] or with --data-dir")
    if data_dir is not None:
        base["data_dir"] = str(Path(data_dir).expanduser().resolve())
    return SweepSpec(base, tables["axes"], tables["zip"], src)


def _slug(values: dict[str, Any]) -> str:
    parts = []
    for k, v in values.items():
        short = k[4:] if k.startswith("set.") else k
        parts.append(f"{short}={v}")
    s = re.sub(r"[^A-Za-z0-9=.,+-]+", "_", "_".join(parts))
    return s[:80]


def _config_hash(cfg: TrainConfig) -> str:
    """Of everything that decides the point's result (not where its data is read from)."""
    import tomli_w

    d = {k: v for k, v in cfg.to_dict().items() if k != "data_dir"}
    return hashlib.sha1(tomli_w.dumps(d).encode()).hexdigest()[:8]


def expand(spec: SweepSpec) -> list[SweepPoint]:
    """Every point of the sweep with its validated TrainConfig (raises ConfigError naming the point)."""
    grid_keys = list(spec.axes)
    zip_keys = list(spec.zipped)
    grid = list(itertools.product(*(spec.axes[k] for k in grid_keys))) if grid_keys else [()]
    zipped = list(zip(*(spec.zipped[k] for k in zip_keys))) if zip_keys else [()]
    points = []
    for i, (g, z) in enumerate(itertools.product(grid, zipped)):
        values = dict(zip(grid_keys, g)) | dict(zip(zip_keys, z))
        opts = dict(spec.base)
        sets = dict(spec.base.get("set", {}))
        for k, v in values.items():
            if k.startswith("set."):
                sets[k[4:]] = v
            else:
                opts[k] = v
        if sets:
            opts["set"] = sets
        try:
            cfg = TrainConfig.from_dict(opts, source=spec.source)
        except ConfigError as e:
            where = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise ConfigError(f"{spec.source}: point {i} ({where}): {e}") from None
        points.append(SweepPoint(i, f"{i:04d}-{_slug(values)}-{_config_hash(cfg)}", values, cfg))
    return points


def check_data(points: list[SweepPoint]) -> list[DataAvailability]:
    """Where each dataset of the sweep comes from (one entry per dataset and data folder)."""
    seen: dict[tuple, DataAvailability] = {}
    for p in points:
        key = (p.config.dataset, p.config.data_dir)
        if key not in seen:
            seen[key] = check_dataset(*key)
    return list(seen.values())


def _ensure_data(points: list[SweepPoint], source: str) -> None:
    """Fail before any point runs if a dataset cannot be had; download a missing one once."""
    for a in check_data(points):
        if a.problem is None:
            continue
        if not a.download:
            raise DataError(f"{source}: {a.problem}; no point was run")
        download_idx(a.name, cache_dir() / "datasets" / a.name)  # DataError (offline) names --data-dir


def run_point(config: dict, run_dir: str, threads: int | None) -> PointResult:
    """Run (or resume, or skip) one point; never raises for a failure of the point itself."""
    import warnings

    import torch

    from mep_hw.train import train
    from mep_hw.train.guards import SettleWarning

    warnings.simplefilter("ignore", SettleWarning)  # recorded in the point's metrics.json
    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    done = _finished(run_dir)
    if done is not None:
        return done
    t0 = time.perf_counter()
    resume = (run_dir / "config.toml").exists()
    try:
        cfg = TrainConfig.from_dict(config, source=str(run_dir))
        # a resumed point reads its data from where this sweep says (the files are checked by MD5)
        res = train(cfg, run_dir, resume=resume, explicit={"data_dir"}, progress=False)
        out = PointResult("completed", res.test_accuracy, time.perf_counter() - t0, len(res.history), None)
        write_json(run_dir / POINT_FILE, out._asdict())
        return out
    except SettleError as e:
        status, err = "diverged", str(e)
    except DivergedError as e:
        status, err = e.status, str(e)
    except MepHwError as e:
        status, err = "failed", f"{type(e).__name__}: {e}"
    except Exception as e:  # a bug or resource error in one point must not stop the sweep
        status, err = "failed", f"{type(e).__name__}: {e} | {traceback.format_exc(limit=-3).strip().splitlines()[-3:]}"
    n = 0
    try:
        n = int(read_json(run_dir / "metrics.json").get("epochs_completed", 0))
    except MepHwError:
        pass
    return PointResult(status, None, time.perf_counter() - t0, n, err)


def _finished(run_dir: Path) -> PointResult | None:
    """The recorded result of a point that completed before, else None."""
    try:
        m = read_json(run_dir / "metrics.json")
        rec = read_json(run_dir / POINT_FILE)
    except MepHwError:
        return None
    if m.get("status") != "completed" or rec.get("status") != "completed":
        return None
    return PointResult("skipped", m.get("test_accuracy"), float(rec.get("wall_seconds", 0.0)), int(m.get("epochs_completed", 0)), None)


def _write_results(out: Path, points: list[SweepPoint], results: dict[int, PointResult], axes: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["point", *axes, "status", "test_accuracy", "wall_seconds", "epochs_completed", "run_dir", "error"])
    for p in points:
        r = results.get(p.index)
        if r is None:
            fields = ["pending", "", "", ""]
        else:
            status = "completed" if r.status == "skipped" else r.status
            acc = "" if r.test_accuracy is None else f"{r.test_accuracy:.6g}"
            fields = [status, acc, f"{r.wall_seconds:.2f}", r.epochs_completed]
        error = "" if r is None else (r.error or "")
        w.writerow([p.index, *(p.values[a] for a in axes), *fields, f"points/{p.name}", error])
    atomic_write_bytes(out / RESULTS_FILE, buf.getvalue().encode())


def read_results(sweep_dir: str | Path) -> list[dict[str, str]]:
    path = Path(sweep_dir) / RESULTS_FILE
    if not path.exists():
        raise ConfigError(f"{sweep_dir} holds no {RESULTS_FILE}; run `mep-hw sweep SWEEP.toml --out {sweep_dir}` first")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run_sweep(
    spec_path: str | Path,
    out: str | Path,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    threads: int | None = None,
    progress: bool | None = None,
    data_dir: str | Path | None = None,
) -> dict[int, PointResult]:
    """Run every point of the sweep (see the module docstring); returns the result per point index.
    ``threads``: torch threads per point (default: cores // workers on the local pool, 1 on Dask).
    ``data_dir``: the data folder of every point (``--data-dir``)."""
    from tqdm.auto import tqdm

    for name, v in (("workers", workers), ("threads", threads)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"--{name} {v!r} must be an integer ≥ 1")
    spec = load_sweep(spec_path, data_dir=data_dir)
    points = expand(spec)
    _ensure_data(points, spec.source)
    out = ensure_dir(out)
    write_toml(out / SPEC_FILE, read_toml(spec_path))  # what ran; points keep their own config.toml
    axes = list(spec.axes) + list(spec.zipped)
    results: dict[int, PointResult] = {}
    todo = []
    for p in points:
        done = _finished(out / "points" / p.name)
        if done is not None:
            results[p.index] = done
        else:
            todo.append(p)
    _write_results(out, points, results, axes)
    if not todo:
        return results
    cores = os.cpu_count() or 1
    client = None
    if scheduler:
        try:
            from dask.distributed import Client
        except ImportError:
            raise ConfigError("--scheduler needs dask.distributed: pip install 'dask[distributed]'") from None
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise ConfigError(f"--scheduler {scheduler}: cannot reach the Dask scheduler ({e}); check the address") from None
        executor = client.get_executor(pure=False)
        threads = threads or 1
    else:
        n = min(workers or cores, len(todo))
        # spawn, not fork: forking a process whose torch thread pool is running can deadlock
        executor = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"))
        threads = threads or max(1, cores // n)
    bar = tqdm(total=len(todo), desc="sweep", unit="point", disable=(not progress) if progress is not None else None)
    try:
        futures: dict[Future, SweepPoint] = {
            executor.submit(run_point, p.config.to_dict(), str(out / "points" / p.name), threads): p for p in todo
        }
        for fut in as_completed(futures):
            p = futures[fut]
            try:
                r = fut.result()
            except Exception as e:  # the worker itself died (killed, out of memory)
                r = PointResult("failed", None, 0.0, 0, f"worker lost: {type(e).__name__}: {e}")
            results[p.index] = r
            _write_results(out, points, results, axes)
            bar.update(1)
            bar.set_postfix(last=f"{p.index}:{r.status}")
    finally:
        bar.close()
        if client is not None:
            client.close()
        else:
            executor.shutdown(wait=True, cancel_futures=True)
    return results

"""HDF5 training traces (``RUN_DIR/trace.h5``), written with h5py and readable with plain h5py.

Layout (every dataset is chunked, resizable along its first axis and has a ``units`` attribute,
"1" meaning dimensionless; the per-record arrays of integers are gzip-compressed with the shuffle
filter, one record per chunk, so each chunk is written once; float arrays are stored raw: gzip
saves ~17 % of their bytes at ~25× the write time, see docs/traces.md; the scalar series are not
compressed: their 256-record chunks are rewritten in place at every record, and a compressed
chunk — whose size changes — killed mid-rewrite would take the committed records of that chunk
with it)::

    /                       attrs: format="mep_hw.trace", version, config_toml, device_json,
                                   trace_every, mep_hw_version
    /intervals/step         (n,)  global optimizer step of each interval (0 = before training)
    /intervals/epoch        (n,)  epoch the step belongs to (0 = before training)
    /intervals/<group>/<name>  (n, ...)  any per-interval record, e.g.
        layers/W0/weight    (n, out, in)  logical weights held       units "1"
        layers/W0/g_plus    (n, out, in)  physical state             units "uS" (rad, LSB, …)
        layers/W0/pulses_up (n,)          cumulative pulse counts    units "pulses"
        settle/free_steps_mean, settle/free_residual_mean, energy/free_mean, metrics/train_loss, …
    /epochs/epoch           (m,)  one row per finished epoch
    /epochs/<field>         (m,)  the epoch's metrics (test_accuracy, train_loss, …)

Crash safety: each record writes its datasets first and its commit marker (``intervals/step``,
``epochs/epoch``) last, then flushes the file. A run killed (even with SIGKILL) therefore leaves
a file whose committed length is the marker's length; a longer dataset (an interval cut mid-write)
is ignored by :func:`read_trace` and trimmed by :meth:`TraceWriter.open` on resume. The file is
kept in HDF5's default (non-SWMR) format because a SWMR writer killed mid-run marks the file as
open, and plain h5py then refuses to read it. A flush is not atomic, though: a run killed *during*
one can leave the marker's new length on disk before the file's end-of-allocation that covers the
record's chunks ("addr overflow" on reading them). :func:`read_trace` then backs off to the longest
prefix it can read (warning how many records it dropped), and a resume rebuilds the file from that
prefix (:meth:`TraceWriter.open`), so a kill loses at most the records of the flush it interrupted.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mep_hw.errors import StorageError, TraceError
from mep_hw.io.runs import storage_error

__all__ = ["FORMAT", "VERSION", "TraceWriter", "Trace", "read_trace", "describe_trace"]

FORMAT = "mep_hw.trace"
VERSION = 1
_COMPRESS = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
_SERIES_CHUNK = 256  # records per chunk of a scalar series (one record per chunk for arrays)


def _h5py():
    import h5py

    return h5py


def _open_foreign(path: Path, mode: str):
    h5py = _h5py()
    if not path.exists():
        raise TraceError(f"trace {path} does not exist; run `mep-hw train … --trace-every N` to write one")
    try:
        # reading takes no lock, so a live run's trace can be inspected (as of its last flush)
        f = h5py.File(path, mode, **({"locking": False} if mode == "r" else {}))
    except OSError as e:
        raise TraceError(
            f"{path} is not a readable HDF5 file ({e}); it is corrupt or not a trace — "
            "delete it (a resumed run with --trace-every writes a new one) or restore a copy"
        ) from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise TraceError(f"{path} is an HDF5 file but not an mep_hw trace (no format={FORMAT!r} attribute)")
    if int(f.attrs.get("version", -1)) > VERSION:
        v = int(f.attrs["version"])
        f.close()
        raise TraceError(f"{path} is trace version {v}; this mep_hw reads up to {VERSION}: upgrade mep_hw")
    return f


def _prefix(group, marker: str, datasets: dict, *, upto: int | None = None) -> tuple[int, int, dict]:
    """(committed, readable, data): the group's committed record count (its marker's length, at
    most ``upto``), the longest prefix ≤ it whose records every dataset of ``datasets`` can read,
    and those records. A run killed during a flush can leave the last records' chunks past the
    file's end-of-allocation; they are dropped (see the module docstring)."""
    n = group[marker].shape[0] if marker in group else 0
    if upto is not None:
        n = min(n, upto)
    k = n
    while True:
        try:
            return n, k, {name: ds[:k] for name, ds in datasets.items()}
        except OSError:
            if k == 0:
                raise
            k -= 1


def _walk(group, prefix="") -> dict[str, Any]:
    out = {}
    for k, v in group.items():
        name = f"{prefix}{k}"
        if hasattr(v, "shape"):
            out[name] = v
        else:
            out.update(_walk(v, name + "/"))
    return out


class TraceWriter:
    """Append records to a trace file; see the module docstring for the layout.

    ``TraceWriter.open(path, attrs, keep_step=None)`` creates a new file (``keep_step`` None) or
    reopens an existing one, keeping only the intervals with step ≤ ``keep_step`` and the epochs
    ≤ ``keep_epoch`` (what a resumed run's checkpoint covers), so the resumed run appends without
    duplicates or gaps.
    """

    def __init__(self, f, path: Path):
        self.f, self.path = f, path

    @classmethod
    def open(cls, path: str | Path, attrs: dict[str, Any], *, keep_step: int | None = None, keep_epoch: int = 0) -> "TraceWriter":
        h5py = _h5py()
        path = Path(path)
        try:
            if keep_step is None or not path.exists():
                f = h5py.File(path, "w")
                f.attrs["format"] = FORMAT
                f.attrs["version"] = VERSION
                for k, v in attrs.items():
                    f.attrs[k] = v
                f.create_group("intervals")
                f.create_group("epochs")
                f.flush()
                return cls(f, path)
            _rebuild_if_cut(path, keep_step, keep_epoch)
            f = _open_foreign(path, "r+")
            w = cls(f, path)
            w._truncate("intervals", "step", lambda steps: int(np.searchsorted(steps, keep_step, side="right")))
            w._truncate("epochs", "epoch", lambda ep: int(np.searchsorted(ep, keep_epoch, side="right")))
            f.flush()
            return w
        except (TraceError, StorageError):
            raise
        except OSError as e:  # h5py: read-only folder, full disk, a file where the folder should be
            raise storage_error(e, path) from None

    def _truncate(self, group: str, marker: str, keep) -> None:
        g = self.f[group]
        if marker not in g:
            for ds in _walk(g).values():
                ds.resize(0, axis=0)
            return
        n = keep(g[marker][:])
        for ds in _walk(g).values():
            if ds.shape[0] > n:
                ds.resize(n, axis=0)

    def _append(self, group: str, marker: str, values: dict[str, tuple[Any, str]]) -> None:
        try:
            self._write(group, marker, values)
        except (TraceError, StorageError):
            raise
        except OSError as e:  # a full disk: what was committed before stays readable
            raise storage_error(e, self.path) from None

    def _write(self, group: str, marker: str, values: dict[str, tuple[Any, str]]) -> None:
        g = self.f[group]
        n = g[marker].shape[0] if marker in g else 0
        known = set(_walk(g))
        if known and set(values) != known:
            extra, missing = sorted(set(values) - known), sorted(known - set(values))
            raise TraceError(
                f"{self.path}: a {group} record must hold the same datasets as the file "
                f"(new: {extra}, missing: {missing}); start a new trace for a different run"
            )
        # every dataset first, the commit marker last
        for name in sorted(values, key=lambda k: k == marker):
            value, units = values[name]
            a = np.asarray(value)
            if name not in g:
                chunks = (1, *a.shape) if a.ndim else (_SERIES_CHUNK,)
                # gzip pays for integers (fixed-point codes, counts); on float arrays (weights,
                # conductances, phases) it saves ~17 % of the bytes at ~25× the write time (measured:
                # docs/traces.md), so those are stored raw; the scalar series are never compressed
                # (crash safety, see the module docstring)
                opts = _COMPRESS if a.ndim and a.dtype.kind not in "fc" else {}
                ds = g.create_dataset(name, shape=(0, *a.shape), maxshape=(None, *a.shape), dtype=a.dtype, chunks=chunks, **opts)
                ds.attrs["units"] = units
            ds = g[name]
            if ds.shape[1:] != a.shape:
                raise TraceError(f"{self.path}: {group}/{name} holds shape {ds.shape[1:]} per record, got {a.shape}")
            ds.resize(n + 1, axis=0)
            ds[n] = a
        self.f.flush()

    def count(self, group: str = "intervals") -> int:
        """Committed records in ``group`` (intervals or epochs)."""
        marker = "step" if group == "intervals" else "epoch"
        g = self.f[group]
        return g[marker].shape[0] if marker in g else 0

    def interval(self, step: int, epoch: int, values: dict[str, tuple[Any, str]]) -> None:
        """Append one interval: ``values`` maps dataset paths under /intervals to (array, units)."""
        self._append("intervals", "step", {**values, "epoch": (np.int32(epoch), "1"), "step": (np.int64(step), "steps")})

    def epoch(self, epoch: int, values: dict[str, tuple[Any, str]]) -> None:
        self._append("epochs", "epoch", {**values, "epoch": (np.int32(epoch), "1")})

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Trace(NamedTuple):
    path: Path
    attrs: dict[str, Any]
    config: dict  # the run's config.toml, parsed
    intervals: dict[str, np.ndarray]  # committed records only
    epochs: dict[str, np.ndarray]
    units: dict[str, str]  # "intervals/<name>" or "epochs/<name>" → units


def read_trace(path: str | Path, *, arrays: bool = True) -> Trace:
    """Read a trace (committed records only). ``arrays=False`` reads only the scalar series and
    leaves the per-interval arrays out (they can be large)."""
    path = Path(path)
    with _open_foreign(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        try:
            config = tomllib.loads(str(attrs.get("config_toml", "")))
        except tomllib.TOMLDecodeError as e:
            raise TraceError(f"{path}: the stored run config is not valid TOML ({e})") from None
        out, units = {}, {}
        for group, marker in (("intervals", "step"), ("epochs", "epoch")):
            g = f[group]
            sets = _walk(g)
            for name, ds in sets.items():
                units[f"{group}/{name}"] = str(ds.attrs.get("units", ""))
            n, k, out[group] = _prefix(g, marker, {m: ds for m, ds in sets.items() if arrays or ds.ndim == 1})
            if k < n:
                warnings.warn(f"{path}: the last {n - k} of {n} {group} records were cut by a kill during a flush "
                              f"and are dropped; {k} are read", stacklevel=2)
    return Trace(path, attrs, config, out["intervals"], out["epochs"], units)


def _rebuild_if_cut(path: Path, keep_step: int, keep_epoch: int) -> None:
    """Before a resume appends to ``path``: if the records the resume keeps (intervals with step ≤
    ``keep_step``, epochs ≤ ``keep_epoch``) cannot all be read back — a kill during a flush — write
    the readable prefix to a new file and put it in place of the old one (atomically), so the
    resumed run appends to a consistent file."""
    with _open_foreign(path, "r") as f:
        groups = []  # (group, marker, records kept, datasets)
        for group, marker, last in (("intervals", "step", keep_step), ("epochs", "epoch", keep_epoch)):
            g = f[group]
            upto = int(np.searchsorted(g[marker][:], last, side="right")) if marker in g else 0
            groups.append((g, marker, upto, _walk(g)))
        try:  # the cheap check: the last kept record and everything after it (a cut is at the end)
            for _, _, upto, sets in groups:
                for ds in sets.values():
                    ds[max(upto - 1, 0):]
            return
        except OSError:
            pass
        keep = {}
        for g, marker, upto, sets in groups:
            group = g.name.strip("/")
            _, _, data = _prefix(g, marker, sets, upto=upto)
            keep[group] = {name: (data[name], ds.attrs.get("units", ""), ds.chunks, ds.compression,
                                  ds.compression_opts, ds.shuffle) for name, ds in sets.items()}
        attrs = dict(f.attrs)
    warnings.warn(f"{path}: records cut by a kill during a flush; rebuilding the trace from what can be read",
                  stacklevel=3)
    tmp = path.with_name(path.name + ".rebuild")
    with _h5py().File(tmp, "w") as out:
        for k, v in attrs.items():
            out.attrs[k] = v
        for group, sets in keep.items():
            g = out.create_group(group)
            for name, (a, units, chunks, comp, comp_opts, shuffle) in sets.items():
                ds = g.create_dataset(name, data=a, maxshape=(None, *a.shape[1:]), chunks=chunks, compression=comp,
                                      compression_opts=comp_opts, shuffle=shuffle)
                ds.attrs["units"] = units
    os.replace(tmp, path)


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def describe_trace(path: str | Path) -> str:
    """A human-readable summary of a trace: run, intervals, datasets with shapes and units, last metrics."""
    path = Path(path)
    lines = []
    with _open_foreign(path, "r") as f:
        cfg = str(f.attrs.get("config_toml", ""))
        dev = f.attrs.get("device_json", "null")
        card = json.loads(dev) if dev and dev != "null" else None
        g, e = f["intervals"], f["epochs"]
        n = g["step"].shape[0] if "step" in g else 0
        m = e["epoch"].shape[0] if "epoch" in e else 0
        lines.append(f"{path}: mep_hw trace v{int(f.attrs['version'])}, {path.stat().st_size / 2**20:.1f} MiB")
        try:
            summary = tomllib.loads(cfg)
        except tomllib.TOMLDecodeError:
            summary = {}
        if "layers" in summary:
            summary["layers"] = "-".join(map(str, summary["layers"]))
        lines.append("run: " + ", ".join(f"{k}={summary[k]}" for k in ("dataset", "layers", "epochs", "seed") if k in summary)
                     + f"; device: {card['name'] if card else 'ideal weights (no device)'}; trace_every={f.attrs.get('trace_every', '?')}")
        if n:
            steps = g["step"][:n]
            lines.append(f"intervals: {n} (steps {int(steps[0])}–{int(steps[-1])}, epochs {int(g['epoch'][0])}–{int(g['epoch'][n - 1])})")
        else:
            lines.append("intervals: 0")
        lines.append(f"epochs recorded: {m}")
        lines.append("datasets:")
        for group in (g, e):
            for name, ds in _walk(group).items():
                stored = ds.id.get_storage_size()
                extra = f"  [{ds.shape[0]} written, {n if group is g else m} committed]" if ds.shape[0] != (n if group is g else m) else ""
                lines.append(f"  {group.name[1:]}/{name:<28} {str(ds.shape):<18} {str(ds.dtype):<8} units={ds.attrs.get('units', '')!s:<8} {_size(stored)}{extra}")
        if m:
            last = {k: e[k][m - 1] for k in ("epoch", "train_loss", "test_accuracy") if k in e}
            lines.append("last epoch: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float | np.floating) and math.isfinite(v) else f"{k}={v}" for k, v in last.items()))
    return "\n".join(lines)

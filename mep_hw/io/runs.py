"""Run folders: atomic writes of JSON, TOML and checkpoints, and their checked reads.

A file is written under a temporary name in the same folder and renamed over the old one, so a
run killed mid-write — or a write that fails because the disk is full — leaves the previous
version intact, never a half-written file. Every filesystem failure (a read-only folder, a full
disk, a file where a folder is expected) is a :class:`~mep_hw.errors.StorageError` whose one-line
message names the path and what to do.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import tempfile
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import tomli_w
import torch

from mep_hw.errors import ConfigError, DataError, StorageError

__all__ = [
    "atomic_write_bytes", "write_json", "read_json", "write_toml", "read_toml", "save_checkpoint", "load_checkpoint",
    "ensure_dir", "storage_error",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's 0600 would hide run files


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def storage_error(e: OSError, path: str | Path, action: str = "write") -> StorageError:
    """The one-line :class:`StorageError` for ``e``, raised while trying to ``action`` ``path``."""
    if isinstance(e, StorageError):
        return e
    code = e.errno
    if code in _FULL:
        why, fix = "the disk is full", "free space there or choose a folder on another disk; the previous version of every file is kept"
    elif code in _DENIED:
        why, fix = "the folder or file is read-only (permission denied)", "choose a writable folder (--out) or change its permissions"
    elif code in (errno.ENOTDIR, errno.EEXIST) or isinstance(e, (NotADirectoryError, FileExistsError)):
        why, fix = "a part of the path is a file, not a folder", "give a folder path (--out names a folder, created if missing)"
    elif isinstance(e, IsADirectoryError):
        why, fix = "it is a folder, not a file", "give the path of a file"
    elif isinstance(e, FileNotFoundError):
        why, fix = "it does not exist", "check the path"
    else:
        why, fix = (e.strerror or str(e) or type(e).__name__), "check the path and the disk"
    return StorageError(f"cannot {action} {path}: {why}; {fix}")


def ensure_dir(path: str | Path, option: str = "--out") -> Path:
    """Create the folder ``path`` (and its parents) or raise a StorageError saying why not."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StorageError(f"{option} {path} is a file, not a folder; give a folder path (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(e, path, "create the folder") from None
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring); StorageError on failure."""
    path = Path(path)
    ensure_dir(path.parent, "the folder of")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise storage_error(e, path) from None
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise storage_error(e, path) from None
        raise


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf; null means "not a number"
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2) + "\n").encode())


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); restore it or delete the run folder") from None
    except OSError as e:
        raise storage_error(e, path, "read") from None


def write_toml(path: str | Path, obj: dict) -> None:
    atomic_write_bytes(path, tomli_w.dumps(obj).encode())


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML ({e}); fix the syntax") from None
    except OSError as e:
        raise storage_error(e, path, "read") from None


def save_checkpoint(path: str | Path, obj: dict) -> None:
    """Write a checkpoint atomically. It is serialised in memory first, so a full disk fails the
    write cleanly (StorageError) and leaves the previous checkpoint in place."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain data only: nothing
    in it is executed). A file that is not one raises DataError saying so."""
    path = Path(path)
    fix = "restore it from a copy or start the run again in a new folder"
    if not path.exists():
        raise DataError(f"checkpoint {path} does not exist")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise storage_error(e, path, "read") from None
    if not is_zip:  # torch.save writes a zip archive; anything else is not ours
        if magic == b"PK\x03\x04":
            raise DataError(f"checkpoint {path} is a truncated or corrupt archive; {fix}")
        raise DataError(f"{path} is not an mep_hw checkpoint (not a torch archive); {fix}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged archive or a foreign pickle
        first = (str(e).strip().splitlines() or [""])[0]
        what = "holds objects other than tensors and plain data" if "weights_only" in first.lower() or "Weights only" in first else "is corrupt or truncated"
        raise DataError(f"checkpoint {path} {what} ({type(e).__name__}), so it is not a readable mep_hw checkpoint; {fix}") from None
    if not isinstance(obj, dict) or "epoch" not in obj:
        raise DataError(f"{path} is not an mep_hw checkpoint (no epoch record); {fix}")
    return obj

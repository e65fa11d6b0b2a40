"""Typed errors of mep_hw.

Every error a user can trigger derives from :class:`MepHwError` and says what was given,
why it is wrong and what to do about it (DESIGN §4.8).
"""

from __future__ import annotations

__all__ = [
    "MepHwError",
    "ConfigError",
    "DeviceError",
    "SettleError",
    "TraceError",
    "DataError",
    "StorageError",
    "DivergedError",
]


class MepHwError(Exception):
    """Base class of every error raised by mep_hw for a user-triggerable condition."""


class ConfigError(MepHwError, ValueError):
    """A configuration value, option name or argument is invalid."""


class DeviceError(MepHwError):
    """A device model was used in a way its physics does not allow."""


class SettleError(MepHwError, RuntimeError):
    """The settling ODE did not reach a steady state for every sample.

    ``result`` holds the :class:`mep_hw.settle.SettleResult` so nothing computed is lost.
    """

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class TraceError(MepHwError):
    """An HDF5 trace file is missing, corrupt or not written by mep_hw."""


class DataError(MepHwError):
    """Data is missing or invalid: a dataset file that is absent, truncated, corrupt or fails its
    checksum, a corrupt run file (checkpoint, metrics), or input tensors holding NaN/inf."""


class StorageError(MepHwError, OSError):
    """A file or folder cannot be written or read: a read-only folder, a full disk, a file where
    a folder is expected. The message names the path and what to do; what was on disk before
    the failed write is kept (every write is atomic)."""


class DivergedError(MepHwError, RuntimeError):
    """A training run stopped because it failed numerically; ``status`` says how:

    * ``"diverged"`` — non-finite or exploding weights (or a non-finite settle);
    * ``"not_settling"`` — the free-phase settles stopped reaching their steady state.

    The message carries the remedy; the run folder keeps the last good checkpoint and records
    the status in metrics.json.
    """

    def __init__(self, message: str, status: str = "diverged"):
        super().__init__(message)
        self.status = status

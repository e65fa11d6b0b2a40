"""Run guards: a resume that continues exactly or refuses with the reason, a learning-rate
schedule that stays reproducible when a run is extended, and a detector that stops a run whose
weights diverge or whose settles stop converging.

**Resume** (:func:`plan_resume`). A run folder is continued from its checkpoint, with the
configuration stored in ``config.toml``. Options given again must agree with it, except

* ``epochs``: a different end. Epochs already finished cannot be undone (a smaller number than
  the checkpoint holds is refused). With the cosine schedule the cycles the run has followed are
  written to ``cosine_cycles`` (the epochs past their sum form one more cycle, a warm restart
  from the base learning rate — SGDR, Loshchilov & Hutter, ICLR 2017), so ``config.toml`` reruns
  the extended run exactly; with a constant schedule the extended run *is* the longer run.
* ``data_dir``: where the data is (the files are checked by MD5, so the data is the same).

Every resume is recorded in ``metrics.json["resumes"]`` with what changed. A run folder whose
``metrics.json`` records finished epochs that its checkpoint does not hold (the checkpoint was
deleted or replaced by an older copy), or whose ``config.toml`` disagrees with the configuration
recorded in ``metrics.json``, is refused: resuming it would silently rewrite its history.

**Schedule** (:func:`restart_schedule`). The cosine schedule runs in cycles of whole epochs; at
the first step of each cycle the learning rate is reset to its base value and the cosine
restarts over the cycle's steps. One cycle of ``epochs`` (the default) is torch's
``CosineAnnealingLR`` over the whole run, step for step.

**Health** (:class:`RunGuard`). Checked every ``check_every`` steps (one host sync each) and at
the end of every epoch:

* ``diverged``: a parameter holds NaN/inf, or its drive scale explodes. A weight matrix W of
  fan-in n drives a unit by up to Σ_j W_ij ρ_j with ρ ∈ [0, 1]; its rms drive scale is
  √n · rms(W) (≈ 0.58 at the U(±1/√n) initialisation), a bias's is rms(b). Above ``drive_limit``
  (10³) every unit is pinned to a bound of its box whatever its input: the network has stopped
  computing, and the weights are on their way to inf.
* ``not_settling``: at least ``stop_limit_frac`` of this epoch's free-phase settles ended at the
  step limit (measured over at least ``min_samples`` samples, or the whole epoch): predictions
  and EP gradients are then taken from states that are not fixed points.

Either stops the run with :class:`~mep_hw.errors.DivergedError` (its ``status`` is the name
above, its message the measurement and the remedy); the loop records the status in
``metrics.json`` and keeps the checkpoint of the last finished epoch. A step-limit share above
``warn_limit_frac`` (free phase) or ``warn_nudged_frac`` (nudged phases) is a
:class:`SettleWarning`, once per epoch and phase, recorded in ``metrics.json["warnings"]``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch

from mep_hw.errors import ConfigError, DataError, DivergedError
from mep_hw.io.runs import load_checkpoint, read_json, read_toml
from mep_hw.train.config import TrainConfig, parse_layers
from mep_hw.train.fit import Observer
from mep_hw.train.tracing import BatchSums, StepTotals

__all__ = [
    "STATUSES", "REMEDIES", "ResumePlan", "plan_resume", "resume_config", "cosine_cycle", "restart_schedule",
    "CosineCycles", "GuardConfig", "RunGuard", "GuardObserver", "SettleWarning", "drive_scales",
]

CONFIG_FILE = "config.toml"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"

#: ``metrics.json["status"]`` values. running: in progress (or killed); interrupted: stopped by
#: Ctrl-C; failed: an error (disk full, …); diverged / not_settling: see the module docstring.
STATUSES = ("running", "completed", "interrupted", "failed", "diverged", "not_settling")

REMEDIES = {
    "diverged": "lower --lr (with Adam every step moves a weight by up to about lr), bound the weights with --spectral-gamma, "
                "or lower --dt",
    "not_settling": "lower --dt or use an adaptive solver (--solver dopri5), raise --max-steps, or make the settle "
                    "contractive with --spectral-gamma 0.9",
}

#: options a resume may change: the end of the run, and where its data is
RESUMABLE_CHANGES = ("epochs", "data_dir")


# ------------------------------------------------------------------------------------------ resume
class ResumePlan(NamedTuple):
    config: TrainConfig  # the stored configuration with the recorded changes
    state: dict | None  # the checkpoint (None: no epoch finished yet, start at epoch 1)
    start_epoch: int
    changes: dict[str, list]  # option → [stored, new], for the options this resume changed
    resumes: list[dict]  # metrics.json["resumes"], this resume appended
    warnings: list[dict]  # metrics.json["warnings"] of the epochs the checkpoint holds


def _norm(name: str, value: Any) -> Any:
    if name == "layers":
        return parse_layers(value)
    if name == "cosine_cycles" and value is not None:
        from mep_hw.train.config import parse_cycles

        return parse_cycles(value)
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        return tuple(value)
    return value


def _show(v: Any) -> str:
    if v is None or v == {}:
        return "none"
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return repr(v)


def resume_config(run_dir: str | Path, given: Mapping[str, Any]) -> tuple[TrainConfig, dict[str, list]]:
    """The configuration a resumed run continues with: ``config.toml`` of ``run_dir`` with the
    options of ``given`` (the ones the user typed) that may change (see the module docstring).
    Returns (config, {option: [stored, new]}); raises ConfigError naming every other option that
    differs from the stored run."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"--resume: {run_dir} holds no run ({CONFIG_FILE} is missing); drop --resume to start one")
    raw = read_toml(path)
    stored = TrainConfig.from_dict(raw, source=str(path))
    clash = {}
    changes: dict[str, list] = {}
    for name, value in given.items():
        try:
            new = _norm(name, value)
        except ConfigError as e:
            raise ConfigError(f"--resume: {e}") from None
        old = getattr(stored, name)
        if name == "set":
            new, old = dict(new or {}), dict(old or {})
        if new == old:
            continue
        if name in RESUMABLE_CHANGES:
            changes[name] = [old, new]
        else:
            clash[name] = (new, old)
    if clash:
        detail = ", ".join(f"{n}={_show(v)} (run has {_show(o)})" for n, (v, o) in sorted(clash.items()))
        raise ConfigError(
            f"--resume continues the run in {run_dir} with its stored config, but {detail}; drop those "
            "options or start a new run with a different --out"
        )
    cfg = stored
    if "data_dir" in changes:
        cfg = cfg.replace(data_dir=changes["data_dir"][1])
    if "epochs" in changes:
        cfg = _change_epochs(cfg, changes["epochs"][1])
    return cfg, changes


def _change_epochs(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """``cfg`` ending after ``epochs``, with the cosine cycles it followed so far made explicit."""
    if cfg.schedule != "cosine":
        return cfg.replace(epochs=epochs)
    cycles = list(cfg.cosine_cycles or ())
    if cfg.epochs > sum(cycles):
        cycles.append(cfg.epochs - sum(cycles))  # the last (implicit) cycle, as the run planned it
    return cfg.replace(epochs=epochs, cosine_cycles=tuple(cycles))


def plan_resume(run_dir: str | Path, given: Mapping[str, Any]) -> ResumePlan:
    """Check that the run in ``run_dir`` can be continued exactly and say how (see the module
    docstring); raises ConfigError or DataError with the reason otherwise."""
    run_dir = Path(run_dir)
    cfg, changes = resume_config(run_dir, given)
    ckpt_path, metrics_path = run_dir / CHECKPOINT_FILE, run_dir / METRICS_FILE
    metrics = read_json(metrics_path) if metrics_path.exists() else {}
    if not isinstance(metrics, dict):
        raise DataError(f"{metrics_path} is not a metrics record (a JSON object); restore it or start a new run")
    recorded = int(metrics.get("epochs_completed") or 0)
    state = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    held = int(state["epoch"]) if state is not None else 0
    if held < recorded:
        what = f"{CHECKPOINT_FILE} is missing" if state is None else f"{CHECKPOINT_FILE} holds only epoch {held}"
        raise DataError(
            f"--resume: {what} but {metrics_path} records {recorded} finished epoch(s); continuing would restart "
            f"from epoch {held + 1} and rewrite that history. Restore the checkpoint of epoch {recorded}, or start "
            "a new run with a different --out"
        )
    if "config" in metrics and metrics["config"]:
        try:
            rec = TrainConfig.from_dict(metrics["config"], source=str(metrics_path)).to_dict()
        except ConfigError as e:
            raise DataError(f"--resume: {metrics_path} records a configuration this mep_hw cannot read ({e})") from None
        now = TrainConfig.from_dict(read_toml(run_dir / CONFIG_FILE)).to_dict()
        differ = sorted(k for k in set(rec) | set(now) if rec.get(k) != now.get(k))
        # a resume that changes epochs or data_dir writes config.toml a moment before metrics.json:
        # a run stopped in between differs there, consistently (no finished epoch beyond its end)
        written_first = {"epochs", "cosine_cycles", "data_dir"}
        if any(k not in written_first for k in differ) or int(now.get("epochs", 0)) < recorded:
            detail = ", ".join(f"{k}: {_show(now.get(k))} vs {_show(rec.get(k))}" for k in differ)
            raise DataError(
                f"--resume: {run_dir / CONFIG_FILE} and {metrics_path} disagree ({detail}); one of them was edited. "
                "Restore it, or start a new run with a different --out"
            )
    if held > cfg.epochs:
        raise ConfigError(
            f"--epochs {cfg.epochs}: the run in {run_dir} has already finished {held} epochs and a resume cannot "
            f"undo them; resume without --epochs, or start a new run with --epochs {cfg.epochs} and a different --out"
        )
    resumes = list(metrics.get("resumes") or [])
    resumes.append({"at_epoch": held, "changes": {k: [_plain(a), _plain(b)] for k, (a, b) in changes.items()}})
    kept = [w for w in (metrics.get("warnings") or []) if isinstance(w, dict) and int(w.get("epoch", 0)) <= held]
    return ResumePlan(cfg, state, held + 1, changes, resumes, kept)


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# ---------------------------------------------------------------------------------------- schedule
def cosine_cycle(cfg: TrainConfig, epoch: int) -> tuple[int, int]:
    """(first epoch, number of epochs) of the cosine cycle that epoch ``epoch`` (1-based) is in."""
    start = 1
    for n in cfg.cosine_cycles or ():
        if epoch < start + n:
            return start, n
        start += n
    return start, max(1, cfg.epochs - start + 1)


def restart_schedule(regime, cfg: TrainConfig, epoch: int, steps_per_epoch: int) -> bool:
    """Keep the learning-rate schedule of ``regime`` (:mod:`mep_hw.train.regimes`) on the cosine
    cycle that epoch ``epoch`` is in; call it before the epoch's first step. At the first epoch
    of a cycle the schedule restarts: the learning rate back to its base value, the cosine over
    the cycle's steps. For the host regime's ``CosineAnnealingLR`` the arithmetic that follows is
    that of a new scheduler, so a restarted cycle is bit-identical to a run that starts with it
    (its cycle length is part of its checkpointed state); the in-array regimes' schedule counts
    steps into the cycle (checkpointed) and is given the cycle's length at every epoch. Returns
    whether it restarted."""
    if cfg.schedule != "cosine":
        return False
    start, n = cosine_cycle(cfg, epoch)
    steps = max(1, n * steps_per_epoch)
    simple = getattr(regime, "schedule", None)  # the in-array regimes' _Schedule (t, total)
    if simple is not None:
        simple.total = steps
        if epoch == start:
            simple.t = 0
        return epoch == start
    sched = getattr(regime, "scheduler", None)
    if sched is None or epoch != start:
        return False
    opt = sched.optimizer
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"]
    sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]
    sched.T_max = steps
    sched.last_epoch = 0
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    return True


class CosineCycles(Observer):
    """Applies :func:`restart_schedule` at the start of every epoch of :func:`~mep_hw.train.fit.fit`."""

    def __init__(self, regime, cfg: TrainConfig, steps_per_epoch: int):
        self.regime, self.cfg, self.steps_per_epoch = regime, cfg, steps_per_epoch

    def begin_epoch(self, epoch: int) -> None:
        restart_schedule(self.regime, self.cfg, epoch, self.steps_per_epoch)


# ------------------------------------------------------------------------------------------ health
class SettleWarning(UserWarning):
    """Many settles of a training run end at their step limit (see :class:`RunGuard`)."""


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    """Thresholds of :class:`RunGuard` (see the module docstring)."""

    drive_limit: float = 1e3  # √fan_in · rms(W) or rms(b) above this: diverged
    stop_limit_frac: float = 0.9  # free-phase step-limit share that stops the run: not_settling
    warn_limit_frac: float = 0.1  # free-phase share that warns
    warn_nudged_frac: float = 0.5  # nudged-phase share that warns (nudged hits are counted, not fatal)
    min_samples: int = 1000  # samples of the epoch before a not_settling stop (or the whole epoch)
    check_every: int = 20  # optimizer steps between checks

    def __post_init__(self):
        for name in ("stop_limit_frac", "warn_limit_frac", "warn_nudged_frac"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ConfigError(f"{name}={v!r} must be in (0, 1]")
        if not (math.isfinite(self.drive_limit) and self.drive_limit > 0):
            raise ConfigError(f"drive_limit={self.drive_limit!r} must be a finite number > 0")
        for name in ("min_samples", "check_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be ≥ 1")


@torch.no_grad()
def drive_scales(params: Sequence[torch.Tensor]) -> list[float]:
    """√fan_in · rms(W) of each weight matrix, rms(b) of each bias (NaN/inf where a parameter is
    not finite), with one host sync. Computed in float64 so that finite weights up to ~1e150 do
    not overflow."""
    ms = [p.detach().double().square().mean() * (p.shape[1] if p.ndim >= 2 else 1)
          * (math.prod(p.shape[2:]) if p.ndim > 2 else 1) for p in params]
    if not ms:
        return []
    return [math.sqrt(v) if v >= 0 else float("nan") for v in torch.stack(ms).tolist()]


def _name(i: int, params: Sequence[torch.Tensor], names: Sequence[str] | None) -> str:
    if names is not None and i < len(names):
        return names[i]
    return f"parameter {i}"


_GUARD_KEYS = ("n", "free_limit", "n_nudged", "nudged_limit")  # the step sums the guard watches


class RunGuard:
    """Watches a training run and stops it when it diverges or stops settling (module docstring).

    ``start_epoch(epoch, n_samples)`` at the start of every epoch; ``after_step(step, epoch,
    sums, params)`` after every optimizer step, with ``sums`` the batch's
    :func:`~mep_hw.train.tracing.batch_sums` (or a mapping of floats or 0-d tensors): they are
    collected without a host read and read every ``check_every`` steps; ``end_epoch(step, epoch, params)`` after the
    epoch's last step. Each raises :class:`~mep_hw.errors.DivergedError` to stop the run.
    ``warnings`` lists the warnings issued (epoch, step, phase, share, message).
    """

    def __init__(self, config: GuardConfig | None = None, *, names: Sequence[str] | None = None,
                 max_steps: int | None = None, nudged_max_steps: int | None = None, warnings: Sequence[dict] = ()):
        self.config = config or GuardConfig()
        self.names = names
        self.max_steps, self.nudged_max_steps = max_steps, nudged_max_steps
        self.warnings: list[dict] = list(warnings)  # earlier ones (a resumed run's) first
        self.start_epoch(0, 0)

    def start_epoch(self, epoch: int, n_samples: int) -> None:
        self.epoch, self.n_epoch = epoch, n_samples
        self._totals = StepTotals()  # this epoch's step sums, read at each check
        self._since = 0
        self._warned: set[str] = set()

    def after_step(self, step: int, epoch: int, sums: BatchSums | Mapping[str, Any], params: Sequence[torch.Tensor]) -> None:
        self._totals.add(sums if isinstance(sums, BatchSums) else {k: sums[k] for k in _GUARD_KEYS})
        self._since += 1
        if self._since >= self.config.check_every:
            self._check(step, epoch, params, end=False)

    def end_epoch(self, step: int, epoch: int, params: Sequence[torch.Tensor]) -> None:
        self._check(step, epoch, params, end=True)

    # -------------------------------------------------------------------------------- checks
    def _check(self, step: int, epoch: int, params: Sequence[torch.Tensor], end: bool) -> None:
        self._since = 0
        self.check_weights(step, epoch, params)
        self.check_settles(step, epoch, end)

    def check_weights(self, step: int, epoch: int, params: Sequence[torch.Tensor]) -> None:
        kept = f"the checkpoint keeps epoch {epoch - 1}" if epoch > 1 else "no epoch finished"
        for i, d in enumerate(drive_scales(params)):
            p = params[i]
            if not math.isfinite(d):
                raise DivergedError(
                    f"diverged at step {step} (epoch {epoch}): {_name(i, params, self.names)} holds NaN or inf "
                    f"({int((~torch.isfinite(p)).sum())} of {p.numel()} values); {kept}; remedy: {REMEDIES['diverged']}",
                    "diverged",
                )
            if d > self.config.drive_limit:
                what = "√fan_in · rms" if p.ndim >= 2 else "rms"
                raise DivergedError(
                    f"diverged at step {step} (epoch {epoch}): {_name(i, params, self.names)} is exploding "
                    f"({what} = {d:.3g} > {self.config.drive_limit:g}, every unit pinned to its bound); {kept}; "
                    f"remedy: {REMEDIES['diverged']}",
                    "diverged",
                )

    def check_settles(self, step: int, epoch: int, end: bool) -> None:
        c = self.config
        s = self._totals.sums  # one host read per check
        n, lim = float(s["n"]), float(s["free_limit"])
        nn, nlim = float(s["n_nudged"]), float(s["nudged_limit"])
        if n <= 0:
            return
        frac = lim / n
        if frac >= c.stop_limit_frac and (n >= min(c.min_samples, max(1, self.n_epoch)) or end):
            cap = f" (--max-steps {self.max_steps})" if self.max_steps else ""
            kept = f"the checkpoint keeps epoch {epoch - 1}" if epoch > 1 else "no epoch finished"
            raise DivergedError(
                f"not settling at step {step} (epoch {epoch}): {100 * frac:.0f} % of this epoch's {int(n)} free-phase "
                f"settles ended at the step limit{cap} without reaching the steady state; {kept}; "
                f"remedy: {REMEDIES['not_settling']}",
                "not_settling",
            )
        if frac >= c.warn_limit_frac:
            self._warn(step, epoch, "free", frac, n,
                       f"raise --max-steps{f' (now {self.max_steps})' if self.max_steps else ''}, lower --dt or use "
                       "--solver dopri5; predictions and gradients use unsettled states")
        if nn > 0 and nlim / nn >= c.warn_nudged_frac:
            self._warn(step, epoch, "nudged", nlim / nn, nn,
                       f"raise --nudged-max-steps{f' (now {self.nudged_max_steps})' if self.nudged_max_steps else ''}; "
                       "the EP gradient is taken from nudged states that have not settled")

    def _warn(self, step: int, epoch: int, phase: str, frac: float, n: float, fix: str) -> None:
        if phase in self._warned:
            return
        self._warned.add(phase)
        msg = (f"epoch {epoch}, step {step}: {100 * frac:.0f} % of {int(n)} {phase}-phase settles so far this epoch "
               f"ended at the step limit; {fix}")
        self.warnings.append({"epoch": epoch, "step": step, "phase": phase, "step_limit_frac": frac, "message": msg})
        warnings.warn(msg, SettleWarning, stacklevel=3)


class GuardObserver(Observer):
    """:class:`RunGuard` as an observer of :func:`~mep_hw.train.fit.fit`: it watches ``params``
    (the tensors the host holds: the weights, or what a device holds, and the biases) after every
    step and after the training pass of every epoch (before its evaluation and checkpoint, so a
    bad epoch is never checkpointed). Its DivergedError stops the run; ``fit`` records the
    error's status. Place it first, so that a diverged step is not recorded."""

    def __init__(self, guard: RunGuard, params: Sequence[torch.Tensor], n_samples: int, steps_per_epoch: int):
        self.guard, self.params, self.n, self.steps_per_epoch = guard, list(params), n_samples, steps_per_epoch

    def begin_epoch(self, epoch: int) -> None:
        self.guard.start_epoch(epoch, self.n)

    def on_step(self, step, epoch, batch, out) -> None:
        self.guard.after_step(step, epoch, out.sums, self.params)

    def end_train(self, epoch: int) -> None:
        self.guard.end_epoch(epoch * self.steps_per_epoch, epoch, self.params)

"""Are the settles of a training run reaching their fixed points? A check the loop calls with
the share of samples that ended a phase at its step limit (and, optionally, the largest rms
residual among them), returning a status and a one-line message with the remedy.

A settle that stops at its step limit leaves a state that is not an equilibrium: the free
phase's output is then not the network's answer and the EP contrast is not the gradient. A
slow settle stops close to its tolerance; a *cycling* one (Euler overshooting a stiff settle,
e.g. the sigmoid at dt = 1, see :data:`mep_hw.train.config.DEFAULT_DT`) stops far from it and
never gets closer, however many steps it is given.

    health = settle_health(cfg, free_limit_frac=stats.free_step_limit_frac,
                           nudged_limit_frac=stats.nudged_step_limit_frac,
                           free_residual_max=r_free, nudged_residual_max=r_nudged)
    if health.status != "ok":
        warnings.warn(health.message)          # or the progress bar / log
    if health.status == "not_settling":
        ...                                    # record the status, stop the run

Thresholds (docs/settle.md): more than :data:`WARN_FRAC` of the samples at the step limit in
either phase gives a warning; :data:`NOT_SETTLING_FRAC` in the free phase is ``not_settling``.
The nudged phases only warn (their hits are counted, not fatal): the residual left at a short
limit does not tell a cycle from a slow settle (a 784-500-500-500-10 hard-sigmoid net at
initialisation leaves up to 1.6e-3 at its 20-step limit, 160 × the tolerance, and converges
given more steps); a residual above :data:`FAR_FACTOR` × the tolerance is named in the message.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

from mep_hw.errors import ConfigError
from mep_hw.settle import SettleStatus
from mep_hw.train.config import DEFAULT_DT, TrainConfig
from mep_hw.train.fit import Observer
from mep_hw.train.guards import SettleWarning

__all__ = ["SettleHealth", "settle_health", "SettleHealthObserver", "SettleHealthWarning", "WARN_FRAC",
           "NOT_SETTLING_FRAC", "FAR_FACTOR", "HEALTH_STATUSES"]

WARN_FRAC = 0.01
NOT_SETTLING_FRAC = 0.5
FAR_FACTOR = 300.0  # measured: cycling settles leave ≥ 630 × the tolerance (sigmoid at dt = 1),
# slow ones ≤ 160 × (a 3-hidden-layer hard-sigmoid net at its 20-step nudged limit)
HEALTH_STATUSES = ("ok", "warning", "not_settling")


class SettleHealth(NamedTuple):
    status: str  # one of HEALTH_STATUSES
    message: str  # "" when ok; otherwise what was seen and what to change, one line


def _remedy(cfg: TrainConfig, phase: str) -> str:
    stable = DEFAULT_DT.get(cfg.activation)
    if cfg.settle_solver == "euler" and stable is not None and cfg.dt > stable:
        return (f"lower --dt to {stable:g} (the default for --activation {cfg.activation}: Euler at dt={cfg.dt:g} "
                "overshoots this settle and cycles instead of converging)")
    limit = "--max-steps" if phase == "free" else "--nudged-max-steps"
    return (f"raise {limit}, lower --dt, or bound the coupling with --spectral-gamma 0.95 "
            "(a contractive coupling has a unique fixed point that Euler reaches)")


def settle_health(
    cfg: TrainConfig,
    free_limit_frac: float,
    nudged_limit_frac: float,
    *,
    free_residual_max: float | None = None,
    nudged_residual_max: float | None = None,
) -> SettleHealth:
    """Classify one stretch of training (an epoch, or a trace interval) by the share of samples
    that ended the free / nudged phases at their step limits, and the largest rms residual left
    there (optional; named in the message when far above the tolerance)."""
    parts, remedies, status = [], [], "ok"
    for phase, frac, res, atol, limit in (
        ("free", free_limit_frac, free_residual_max, cfg.free_tolerance()[0], cfg.max_steps),
        ("nudged", nudged_limit_frac, nudged_residual_max, cfg.nudged_tolerance(), cfg.nudged_max_steps),
    ):
        if not (isinstance(frac, (int, float)) and math.isfinite(frac) and 0.0 <= frac <= 1.0):
            raise ConfigError(f"{phase}_limit_frac={frac!r} must be a share in [0, 1]")
        if frac <= WARN_FRAC:
            continue
        far = res is not None and math.isfinite(res) and res > FAR_FACTOR * max(atol, 1e-30)
        what = f"{100 * frac:.0f} % of {phase} settles ended at the step limit ({limit} steps)"
        if res is not None:
            what += f" with rms residual up to {res:.2g} (tolerance {atol:g})"
        if far:
            what += ", far above it: cycling or much too slow"
        if frac >= NOT_SETTLING_FRAC and phase == "free":
            status = "not_settling"
        elif status == "ok":
            status = "warning"
        parts.append(what)
        fix = _remedy(cfg, phase)
        if fix not in remedies:
            remedies.append(fix)
    if not parts:
        return SettleHealth("ok", "")
    head = "settles do not reach their fixed points" if status == "not_settling" else "some settles do not converge"
    return SettleHealth(status, f"{head}: " + "; ".join(parts) + "; " + "; ".join(remedies))


class SettleHealthWarning(SettleWarning):
    """Many settles of a training epoch ended at their step limit (:func:`settle_health`): the
    epoch's summary, with the residual left at the limit; a :class:`~mep_hw.train.guards.SettleWarning`,
    so one filter silences both it and the guard's in-epoch warning."""


def _limit_residual_max(res) -> float | None:
    """The largest rms residual among the samples of ``res`` (a SettleResult) that ended at the
    step limit, None if none did."""
    hit = res.status == SettleStatus.STEP_LIMIT
    return float(res.residual[hit].max()) if bool(hit.any()) else None


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


class SettleHealthObserver(Observer):
    """:func:`settle_health` once per epoch of :func:`~mep_hw.train.fit.fit`, from the epoch's
    step-limit shares (its stats' ``free_step_limit_frac`` / ``nudged_step_limit_frac``) and the
    largest residual left at the limit (from each step's EP result, ``out.result``). A status
    other than ``ok`` is issued as a :class:`SettleHealthWarning`; :meth:`summary` is what
    ``metrics.json`` records under ``settle_health``: the worst status so far and the epochs that
    were not ok. Epochs trained before a resume are judged from their stats alone."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.residuals: dict[int, tuple[float | None, float | None]] = {}
        self.records: dict[int, dict] = {}

    def begin_epoch(self, epoch: int) -> None:
        self.residuals[epoch] = (None, None)

    def on_step(self, step, epoch, batch, out) -> None:
        res = getattr(out, "result", None)
        if not hasattr(res, "nudged"):  # not an EP step (backprop settles nothing)
            return
        free, nudged = self.residuals.get(epoch, (None, None))
        free = _max(free, _limit_residual_max(res.free))
        for r in res.nudged:
            nudged = _max(nudged, _limit_residual_max(r))
        self.residuals[epoch] = (free, nudged)

    def judge(self, stats) -> dict:
        free_res, nudged_res = self.residuals.get(stats.epoch, (None, None))
        h = settle_health(self.cfg, stats.free_step_limit_frac, stats.nudged_step_limit_frac,
                          free_residual_max=free_res, nudged_residual_max=nudged_res)
        return {"epoch": stats.epoch, "status": h.status, "message": h.message,
                "free_step_limit_frac": stats.free_step_limit_frac, "nudged_step_limit_frac": stats.nudged_step_limit_frac,
                "free_residual_max": free_res, "nudged_residual_max": nudged_res}

    def on_epoch(self, epoch, stats, history) -> None:
        for s in history:  # earlier epochs of a resumed run, then this one
            if s.epoch not in self.records:
                self.records[s.epoch] = self.judge(s)
        rec = self.records[epoch] = self.judge(stats)
        if rec["status"] != "ok":
            warnings.warn(f"epoch {epoch}: {rec['message']}", SettleHealthWarning, stacklevel=2)

    def summary(self) -> dict:
        """{"status": the worst epoch's, "epochs": the records of the epochs that were not ok}."""
        bad = [r for _, r in sorted(self.records.items()) if r["status"] != "ok"]
        worst = max((r["status"] for r in bad), key=HEALTH_STATUSES.index, default="ok")
        return {"status": worst, "epochs": bad}

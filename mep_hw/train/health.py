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

Thresholds (measured, docs/settle.md): :data:`WARN_FRAC` of the samples at the step limit in
either phase gives a warning; :data:`NOT_SETTLING_FRAC` in the free phase — or in the nudged
phases with a residual above :data:`FAR_FACTOR` × their tolerance, i.e. cycling rather than
slow — is ``not_settling``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from mep_hw.errors import ConfigError
from mep_hw.train.config import DEFAULT_DT, TrainConfig

__all__ = ["SettleHealth", "settle_health", "WARN_FRAC", "NOT_SETTLING_FRAC", "FAR_FACTOR", "HEALTH_STATUSES"]

WARN_FRAC = 0.01
NOT_SETTLING_FRAC = 0.5
FAR_FACTOR = 10.0
HEALTH_STATUSES = ("ok", "warning", "not_settling")


class SettleHealth(NamedTuple):
    status: str  # one of HEALTH_STATUSES
    message: str  # "" when ok; otherwise what was seen and what to change, one line


def _remedy(cfg: TrainConfig, phase: str) -> str:
    stable = DEFAULT_DT.get(cfg.activation)
    if cfg.solver == "euler" and stable is not None and cfg.dt > stable:
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
    there (optional; it tells a cycling settle from a slow one)."""
    parts, status = [], "ok"
    for phase, frac, res, atol, limit in (
        ("free", free_limit_frac, free_residual_max, cfg.atol, cfg.max_steps),
        ("nudged", nudged_limit_frac, nudged_residual_max, cfg.nudged_atol, cfg.nudged_max_steps),
    ):
        if not (isinstance(frac, (int, float)) and math.isfinite(frac) and 0.0 <= frac <= 1.0):
            raise ConfigError(f"{phase}_limit_frac={frac!r} must be a share in [0, 1]")
        if frac <= WARN_FRAC:
            continue
        far = res is not None and math.isfinite(res) and res > FAR_FACTOR * max(atol, 1e-30)
        what = f"{100 * frac:.0f} % of {phase} settles ended at the step limit ({limit} steps)"
        if res is not None:
            what += f" with rms residual up to {res:.2g} (tolerance {atol:g})"
        if frac >= NOT_SETTLING_FRAC and (phase == "free" or far):
            status = "not_settling"
        elif status == "ok":
            status = "warning"
        parts.append(f"{what}; {_remedy(cfg, phase)}")
    if not parts:
        return SettleHealth("ok", "")
    head = "settles do not reach their fixed points" if status == "not_settling" else "some settles do not converge"
    return SettleHealth(status, f"{head}: " + "; ".join(parts))

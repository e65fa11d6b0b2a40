"""The settling engine as it was before issue 14 (commit 193ffb1), kept verbatim as a test oracle:
the new engine must give the same per-sample results (bit-identical where its finished samples
were frozen at their finishing step here too, i.e. ``compact_frac=0, compact_min=0``)."""

import math
from typing import Sequence

import torch
from torch import Tensor

from mep_hw.errors import SettleError
from mep_hw.settle import SettleConfig, SettleResult, SettleStatus
from mep_hw.settle.engine import _comb, _proj, check_init, rk_step


def reference_settle(
    dynamics,
    init: Sequence[Tensor],
    config: SettleConfig | None = None,
    *,
    throw: bool = True,
    compact_frac: float = 0.25,
    compact_min: int = 32,
) -> SettleResult:
    """Integrate ``dynamics`` from ``init`` (one (batch, n_l) tensor per layer) until each sample
    is steady (see the module docstring).

    Finished samples leave the working batch when they make up ``compact_frac`` of it and number
    at least ``compact_min`` (removing rows costs a fixed number of tensor operations, worth it
    only for enough rows; 0 and 0: at once). Until then they keep relaxing, which only lowers
    their residual. Their step count is the step at which they first met the test.

    A solver registered as a backend (``solver="brian2"``, see :data:`BACKENDS`) hands the
    settle, with all these arguments, to that backend, which has the same contract.

    Raises :class:`SettleError` (with the result attached) if any sample ends at the step limit
    or non-finite, unless ``throw=False``, in which case the status is in the result.
    """
    cfg = config or SettleConfig()
    tab = cfg.get_tableau()
    box = dynamics.box
    sizes = check_init(init, dynamics.sizes)
    s = _proj(torch.cat(list(init), dim=1), box)  # our own copy, updated in place below
    B, N = s.shape
    dev, dtype = s.device, s.dtype
    # Working batch: original index and the step at which each sample finished (-1: running).
    active = torch.arange(B, device=dev)
    fin_step = torch.full((B,), -1, dtype=torch.int64, device=dev)
    running = torch.ones(B, dtype=torch.bool, device=dev)
    n_run = B
    chunks = []  # (original index, state, ‖f‖, finish step, finish time) of samples taken out
    dyn = dynamics
    field = dyn.field
    # a dynamics read through noisy devices declares the rms of its field noise per component:
    # twice that is added to the absolute tolerance (a settle cannot get below its own noise)
    atol_n = (cfg.atol + 2.0 * float(getattr(dynamics, "noise_floor", 0.0))) * math.sqrt(N)
    use_rtol = cfg.rtol > 0
    # Euler with dt ≤ 1 on a box field of the form clip(·) − s moves each state to a convex
    # combination of two points of the box: projection is then a no-op and is skipped.
    euler = tab.name == "euler"
    pbox = None if (euler and cfg.dt <= 1.0) else box
    adaptive = tab.adaptive
    if adaptive:
        h: float | Tensor = torch.full((B, 1), float(cfg.dt), dtype=dtype, device=dev)
        t_now = torch.zeros(B, dtype=dtype, device=dev)
        t_fin = torch.zeros(B, dtype=dtype, device=dev)
        expo = -1.0 / (tab.err_order + 1)
    k = field(s)
    nfev = 1
    n = 0

    def take(ix: Tensor | None, rn: Tensor) -> None:
        t = torch.where(fin_step >= 0, t_fin, t_now) if adaptive else None
        if ix is None:
            chunks.append((active, s, rn, fin_step, t))
        else:
            chunks.append((active[ix], s[ix], rn[ix], fin_step[ix], t[ix] if adaptive else None))

    for n in range(cfg.max_steps + 1):
        rn = torch.linalg.vector_norm(k, dim=1)
        if n < cfg.min_steps:  # too early to stop anyone
            pending = torch.ones_like(running)
        elif use_rtol:
            pending = rn > torch.linalg.vector_norm(s, dim=1).mul_(cfg.rtol).add_(atol_n)
        else:
            pending = rn > atol_n
        # NaN compares false, so a NaN residual counts as finished (it is labelled NONFINITE).
        if n_run == running.shape[0]:  # no finished rows linger in the working batch
            any_new = not bool(pending.all())
            new = pending.logical_not() if any_new else None
        else:
            new = pending.logical_not().logical_and_(running)
            any_new = bool(new.any())
        if any_new:
            fin_step = torch.where(new, n, fin_step)
            if adaptive:
                t_fin = torch.where(new, t_now, t_fin)
            running = running.logical_and_(pending)
            n_run = int(running.sum())
        if n_run == 0 or n == cfg.max_steps:
            take(None, rn)
            break
        n_fin = running.shape[0] - n_run
        if n_fin > 0 and n_fin >= max(compact_frac * running.shape[0], compact_min):
            take(running.logical_not().nonzero().squeeze(1), rn)
            ki = running.nonzero().squeeze(1)
            active, s, k, fin_step = active[ki], s[ki], k[ki], fin_step[ki]
            running = torch.ones(n_run, dtype=torch.bool, device=dev)
            dyn = dyn.restrict(ki)
            field = dyn.field
            if adaptive:
                h, t_now, t_fin = h[ki], t_now[ki], t_fin[ki]

        if euler:  # s ← s + dt·f(s), in place
            _proj(s.add_(k, alpha=cfg.dt), pbox)
            k = field(s)
            nfev += 1
            continue
        if not adaptive:
            s, _ = rk_step(field, tab, s, k, float(cfg.dt), pbox)
            k = field(s)
            nfev += tab.stages
            continue
        s_new, ks = rk_step(field, tab, s, k, h, pbox)
        nfev += tab.stages - 1
        # local error estimate, per component scaled by err_atol + err_rtol·max(|s|, |s_new|)
        err = _comb(torch.zeros_like(s), tab.b_err, ks, h)
        scale = torch.maximum(s.abs(), s_new.abs()).mul_(cfg.err_rtol).add_(cfg.err_atol)
        en = torch.linalg.vector_norm(err.div_(scale), dim=1) / math.sqrt(N)
        accept = en <= 1.0
        factor = torch.nan_to_num(0.9 * en.clamp_min(1e-10).pow(expo), nan=0.2).clamp(0.2, 5.0)
        acc = accept.unsqueeze(1)
        s = torch.where(acc, s_new, s)
        k = torch.where(acc, ks[-1], k)
        t_now = t_now + torch.where(accept, h.squeeze(1), 0.0)
        h = (h * factor.unsqueeze(1)).clamp_max(cfg.dt_max)

    # Assemble the per-sample outputs from the chunks, in the original sample order.
    idx, st, rn, fs = (torch.cat([c[i] for c in chunks]) for i in range(4))
    order = torch.empty_like(idx)
    order[idx] = torch.arange(B, device=dev)
    st, rn, fs = st[order], rn[order], fs[order]
    done = fs >= 0
    status = torch.where(done, SettleStatus.CONVERGED, SettleStatus.STEP_LIMIT)
    status = torch.where(rn.isnan() | rn.isinf(), SettleStatus.NONFINITE, status).to(torch.int8)
    steps = torch.where(done, fs, n)
    if adaptive:
        time = torch.cat([c[4] for c in chunks])[order]
    else:
        time = steps.to(dtype) * cfg.dt
    result = SettleResult(tuple(st.split(list(sizes), dim=1)), status, steps, rn / math.sqrt(N), time, nfev)
    if throw and not result.converged:
        raise SettleError(f"settle did not reach a steady state: {result.message}", result)
    return result

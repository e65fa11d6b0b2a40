"""The EP training loop: minibatches, host optimizer step, evaluation, checkpoints, metrics.

Randomness comes only from generators seeded by the run's seed: the weight initialisation from
``seed``, the shuffle (and β signs) of epoch e from a generator seeded by (seed, e). A run
therefore resumes from the checkpoint of its last finished epoch exactly as if it had never
stopped, and the same seed gives the same metrics on the same machine.

A run folder holds ``config.toml`` (the full configuration), ``checkpoint.pt`` (weights,
optimizer and schedule state, history; rewritten atomically after every epoch) and
``metrics.json`` (written when the run starts, after every epoch, and when the run is
interrupted, diverges or fails, with ``status`` saying which: one of
:data:`mep_hw.train.guards.STATUSES`), and with ``--trace-every`` an HDF5 ``trace.h5``
(see :mod:`mep_hw.train.tracing` and :mod:`mep_hw.io.trace`). What a resume may change, and
when a run is stopped as ``diverged`` or ``not_settling``: :mod:`mep_hw.train.guards`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from mep_hw.ep import assign_grads, ep_gradients, free_phase
from mep_hw.errors import ConfigError, DivergedError, MepHwError, SettleError, StorageError
from mep_hw.io import Dataset, load_dataset
from mep_hw.io.runs import ensure_dir, save_checkpoint, write_json, write_toml
from mep_hw.model import LayeredHopfield, one_hot
from mep_hw.optimizers import SDMEPOptimizer, SMEPOptimizer
from mep_hw.optimizers.strategies import SpectralConstraint
from mep_hw.train.config import TrainConfig
from mep_hw.host.flops import ep_estimate_flops, host_step_flops
from mep_hw.train.cost import CostAccumulator
from mep_hw.train.guards import RunGuard, plan_resume, restart_schedule
from mep_hw.train.hardware import HardwareNetwork
from mep_hw.train.tracing import StepTotals, batch_sums, epoch_units, interval_values, open_trace, parse_trace_every

__all__ = ["EpochStats", "TrainResult", "train", "evaluate", "build_model", "build_optimizer", "epoch_generator", "iterate_batches"]

CONFIG_FILE = "config.toml"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"


class EpochStats(NamedTuple):
    epoch: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    epoch_seconds: float  # the training pass only
    eval_seconds: float
    free_steps_mean: float
    nudged_steps_mean: float
    free_step_limit_frac: float  # share of samples that ended at the step limit
    nudged_step_limit_frac: float
    lr: float
    pulses_up: int = 0  # device pulses in this epoch (0 on ideal weights)
    pulses_down: int = 0
    refreshes: int = 0
    free_time_mean: float = 0.0  # settle time per sample, units of τ (× the card's tau_s: seconds)
    nudged_time_mean: float = 0.0  # per sample and nudged phase


class TrainResult(NamedTuple):
    run_dir: Path
    test_accuracy: float
    history: tuple[EpochStats, ...]
    status: str  # completed (a run that stops otherwise raises: see mep_hw.train.guards)


def epoch_generator(seed: int, epoch: int, device="cpu") -> torch.Generator:
    """The generator of epoch ``epoch`` (1-based) of a run seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def iterate_batches(n: int, batch_size: int, generator: torch.Generator):
    """Index tensors of a shuffled pass over n samples (the last batch may be smaller)."""
    perm = torch.randperm(n, generator=generator)
    return perm.split(batch_size)


def build_model(cfg: TrainConfig, input_dim: int, n_classes: int) -> LayeredHopfield:
    layers = cfg.layers or (input_dim, 500, n_classes)
    if layers[0] != input_dim or layers[-1] != n_classes:
        raise ConfigError(
            f"layers={','.join(map(str, layers))} do not fit dataset {cfg.dataset!r}, which has "
            f"{input_dim} inputs and {n_classes} classes; use --layers {input_dim},…,{n_classes}"
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    model = LayeredHopfield(layers, activation=cfg.activation, cost=cfg.cost, generator=gen, dtype=cfg.torch_dtype)
    return model.to(cfg.torch_device)


def build_optimizer(cfg: TrainConfig, params, steps_total: int):
    fused = {"fused": True} if cfg.torch_device == "cpu" or cfg.torch_device.startswith("cuda") else {}
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    elif cfg.optimizer in ("muon", "dion"):  # the EP gradient arrives in .grad: the optimizer's backprop mode
        cls = SMEPOptimizer if cfg.optimizer == "muon" else SDMEPOptimizer
        opt = cls(params, mode="backprop", lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = None
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps_total))
    return opt, sched


@torch.no_grad()
def evaluate(model: LayeredHopfield, x: Tensor, y: Tensor, cfg: TrainConfig, dynamics_kw: dict | None = None) -> tuple[float, float, float, float]:
    """(accuracy, mean cost, mean free-phase steps, mean free-phase settle time in τ) of the free
    phase on (x, y); with ``dynamics_kw`` (device tiles) the weights are read through the devices."""
    ep = cfg.ep_config()
    correct, loss, steps, stime = 0, 0.0, 0, 0.0
    for i in range(0, x.shape[0], cfg.eval_batch_size):
        xb, yb = x[i : i + cfg.eval_batch_size], y[i : i + cfg.eval_batch_size]
        res = free_phase(model, xb, ep, check=False, dynamics_kw=dynamics_kw)
        correct += int((model.logits(res.states).argmax(1) == yb).sum())
        loss += float(model.cost_fn(res.states, one_hot(yb, model.layers[-1], x.dtype)).sum())
        steps += int(res.steps.sum())
        stime += float(res.time.sum())
    n = max(1, x.shape[0])
    return correct / n, loss / n, steps / n, stime / n


def _tensors(ds: Dataset, cfg: TrainConfig):
    dev, dt = cfg.torch_device, cfg.torch_dtype
    return (
        torch.as_tensor(ds.x_train, dtype=dt, device=dev),
        torch.as_tensor(ds.y_train, device=dev),
        torch.as_tensor(ds.x_test, dtype=dt, device=dev),
        torch.as_tensor(ds.y_test, device=dev),
    )


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    explicit: set[str] | None = None,
    progress: bool | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    dataset: Dataset | None = None,
) -> TrainResult:
    """Train with EP and write the run folder (see the module docstring).

    ``resume`` continues the run in ``run_dir`` from its last checkpoint; ``explicit`` names the
    options the user gave, which must agree with the stored config. ``progress`` shows a bar
    (None: only on a terminal). ``on_batch(epoch, batch)`` is called after every step.
    ``dataset`` overrides loading by name (for tests and embedding).
    """
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT_FILE
    state = None
    plan = None
    if resume:
        # [guards 1/7: resume] continue exactly or refuse with the reason; epochs/data_dir changes recorded
        plan = plan_resume(run_dir, {n: getattr(cfg, n) for n in sorted(explicit or ())})
        cfg, state = plan.config, plan.state
    elif (run_dir / CONFIG_FILE).exists() or ckpt_path.exists():
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose a new --out "
            "(nothing was overwritten)"
        )

    ds = dataset or load_dataset(cfg.dataset, cfg.data_dir, limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    model = build_model(cfg, ds.input_dim, ds.n_classes)
    cfg = cfg.replace(layers=model.layers)
    ensure_dir(run_dir)  # [guards 2/7: a file or read-only folder as --out is a StorageError]
    write_toml(run_dir / CONFIG_FILE, cfg.to_dict())

    xtr, ytr, xte, yte = _tensors(ds, cfg)
    n = xtr.shape[0]
    n_batches = -(-n // cfg.batch_size)
    params = model.param_list()
    opt, sched = build_optimizer(cfg, params, cfg.epochs * n_batches)
    history: list[EpochStats] = []
    start = 1
    card = cfg.card()
    hw = HardwareNetwork(model, card, cfg.seed) if card is not None else None
    spectral_state: dict = {}
    cost_acc = CostAccumulator(phases=1 + (2 if cfg.estimator == "symmetric" else 1))
    shapes = [tuple(w.shape) for w in model.weights]
    bias_sizes = [b.numel() for b in model.biases]
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
        history = [EpochStats(**h) for h in state["history"]]
        start = plan.start_epoch
        if hw is not None:
            hw.load_state_dict(state["hardware"], model)
        cost_acc.load_state_dict(state.get("cost"))
    ep_cfg = cfg.ep_config()
    if hw is not None and hw.noise_floor() > 0:
        # on noisy hardware the steady-state test can hold before a nudge has reached the hidden
        # layers: let every nudged settle take at least one step per layer (and one more)
        ep_cfg = dataclasses.replace(ep_cfg, nudged=dataclasses.replace(ep_cfg.nudged, min_steps=min(model.n_states + 1, ep_cfg.nudged.max_steps)))
    n_out = model.layers[-1]
    weights = list(model.weights)

    # [guards 3/7: health] stops the run as diverged / not_settling; warns on step-limit hits
    guard = RunGuard(names=[f"W{k}" for k in range(len(model.weights))] + [f"b{k}" for k in range(len(model.biases))],
                     max_steps=cfg.max_steps, nudged_max_steps=cfg.nudged_max_steps,
                     warnings=plan.warnings if plan is not None else ())
    guarded = [*model.weights, *model.biases]

    def write_metrics(status: str, error: str | None = None) -> None:
        last = history[-1] if history else None
        write_json(
            run_dir / METRICS_FILE,
            {
                "status": status,
                "error": error,
                "test_accuracy": last.test_accuracy if last else None,
                "train_loss": last.train_loss if last else None,
                "epochs_completed": len(history),
                "history": [h._asdict() for h in history],
                "config": cfg.to_dict(),
                "device": card.to_dict() if card is not None else None,
                "pulses": hw.per_layer() if hw is not None else None,
                "cost": cost_acc.summary(card, cfg, model) if hw is not None else None,
                "warnings": guard.warnings,
                "resumes": plan.resumes if plan is not None else [],
            },
        )

    def record(status: str, error: str | None) -> None:
        try:  # the status is recorded when it can be (not on a full or read-only disk)
            write_metrics(status, error)
        except StorageError:
            pass

    every = parse_trace_every(cfg.trace_every)
    tracer = open_trace(run_dir, cfg, card, resume_epoch=(start - 1) if resume else None, steps_per_epoch=n_batches) if every else None
    acc = StepTotals()  # since the last trace interval
    if state is not None:
        acc.load_state_dict(state.get("trace_acc"))  # [guards 4/7: the interval in progress resumes]
    if tracer is not None and start == 1 and tracer.count() == 0:
        tracer.interval(0, 0, interval_values(model, hw, acc))

    show = progress if progress is not None else None
    try:
        write_metrics("running")
        for epoch in range(start, cfg.epochs + 1):
            restart_schedule(sched, cfg, epoch, n_batches)  # [guards 5/7: cosine cycles]
            guard.start_epoch(epoch, n)
            gen = epoch_generator(cfg.seed, epoch)
            batches = iterate_batches(n, cfg.batch_size, gen)
            t0 = time.perf_counter()
            tot = StepTotals()  # this epoch
            bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
                       disable=(not show) if show is not None else None)
            counts0 = hw.totals() if hw is not None else None
            dyn_kw = hw.dynamics_kw() if hw is not None else None
            for b, idx in enumerate(bar):
                idx = idx.to(xtr.device)
                x, y = xtr.index_select(0, idx), ytr.index_select(0, idx)
                res = ep_gradients(model, x, one_hot(y, n_out, x.dtype), ep_cfg, generator=gen, dynamics_kw=dyn_kw)
                assign_grads(params, res.grads)
                before = [w.detach().clone() for w in weights] if hw is not None else None
                opt.step()
                if hw is not None:
                    hw.write(model, before)
                if cfg.spectral_gamma is not None:
                    if hw is not None:
                        hw.constrain(model, cfg.spectral_gamma, spectral_state)
                    elif model.n_states > 1:
                        SpectralConstraint(gamma=cfg.spectral_gamma).apply_coupled(
                            [w.data for w in weights[1 : model.n_states]], spectral_state)
                if sched is not None:
                    sched.step()
                sums = batch_sums(res, y)
                tot.add(sums)
                step = (epoch - 1) * n_batches + b + 1
                guard.after_step(step, epoch, sums, guarded)  # [guards 3/7]
                if b % 10 == 0:
                    bar.set_postfix(loss=f"{tot.sums['loss'] / ((b + 1) * cfg.batch_size):.4f}")
                if tracer is not None:
                    with torch.no_grad():
                        acc.add(sums, float(model.energy(x, res.free.states).sum()))
                    last = b == n_batches - 1
                    # [guards 6/7: the run's last step is always recorded]
                    if every.due(step, epoch, epoch_end=last, run_end=last and epoch == cfg.epochs):
                        tracer.interval(step, epoch, interval_values(model, hw, acc))
                        acc.reset()
                if on_batch is not None:
                    on_batch(epoch, b)
            epoch_seconds = time.perf_counter() - t0
            guard.end_epoch(epoch * n_batches, epoch, guarded)  # [guards 3/7] a bad epoch is never checkpointed
            t1 = time.perf_counter()
            ops_train = hw.totals() if hw is not None else None
            test_acc, test_loss, test_steps, test_time = evaluate(model, xte, yte, cfg, dyn_kw)
            t = tot.sums
            counts = {}
            if hw is not None:
                # host work per step: the EP estimate (linear in the batch) and the optimizer step
                host_flops = sum(ep_estimate_flops(len(i), shapes) for i in batches) + len(batches) * host_step_flops(cfg.optimizer, shapes, bias_sizes)
                cost_acc.add_epoch(counts0, ops_train, hw.totals(), n=n, host_flops=host_flops,
                                   settle=(t["free_time"] + t["nudged_time"], t["free_steps"] + t["nudged_steps"]),
                                   test=(xte.shape[0], test_time, test_steps))
                counts = {k: ops_train[k] - counts0[k] for k in ("pulses_up", "pulses_down", "refreshes")}
            n_nudged = max(1.0, t["n_nudged"])
            stats = EpochStats(
                epoch=epoch,
                train_loss=t["loss"] / n,
                train_accuracy=t["correct"] / n,
                test_loss=test_loss,
                test_accuracy=test_acc,
                epoch_seconds=epoch_seconds,
                eval_seconds=time.perf_counter() - t1,
                free_steps_mean=t["free_steps"] / n,
                nudged_steps_mean=t["nudged_steps"] / n_nudged,
                free_step_limit_frac=t["free_limit"] / n,
                nudged_step_limit_frac=t["nudged_limit"] / n_nudged,
                lr=float(opt.param_groups[0]["lr"]),
                **counts,
                free_time_mean=t["free_time"] / n,
                nudged_time_mean=t["nudged_time"] / n_nudged,
            )
            # [guards 7/7] the trace's epoch row goes first (a resume from the previous checkpoint
            # trims it), the epoch joins the history only once its checkpoint is on disk (a full
            # disk leaves metrics.json and checkpoint.pt agreeing on the last saved epoch)
            if tracer is not None:
                tracer.epoch(epoch, {k: (v, epoch_units(k)) for k, v in stats._asdict().items() if k != "epoch"})
            save_checkpoint(
                ckpt_path,
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "history": [h._asdict() for h in (*history, stats)],
                    "hardware": hw.state_dict() if hw is not None else None,
                    "cost": cost_acc.state_dict(),
                    "trace_acc": acc.state_dict(),
                },
            )
            history.append(stats)
            write_metrics("running" if epoch < cfg.epochs else "completed")
            if show is not False:
                tqdm.write(
                    f"epoch {epoch}/{cfg.epochs}: train loss {stats.train_loss:.4f} acc {stats.train_accuracy:.4f} | "
                    f"test acc {stats.test_accuracy:.4f} | {epoch_seconds:.1f}s | steps free "
                    f"{stats.free_steps_mean:.1f} nudged {stats.nudged_steps_mean:.1f}"
                )
    except KeyboardInterrupt:
        record("interrupted", f"interrupted during epoch {len(history) + 1}; resume with --resume")
        raise
    except SettleError as e:
        record("diverged", str(e))
        raise
    except DivergedError as e:
        record(e.status, str(e))
        raise
    except MepHwError as e:  # e.g. the disk filled up while writing the checkpoint
        record("failed", str(e))
        raise
    finally:
        if tracer is not None:
            tracer.close()
    write_metrics("completed")
    return TrainResult(run_dir, history[-1].test_accuracy, tuple(history), "completed")

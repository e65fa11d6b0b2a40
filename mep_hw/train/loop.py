"""EP training of a layered Hopfield network, on ideal weights or on a device: ``train()``.

One step: the EP estimate (free and nudged settles, reading every weight through the model's
weight store), then the update regime writes the store (:mod:`mep_hw.train.regimes`); metrics,
the trace, cost accounting and the checkpoint are observers of the loop (:mod:`mep_hw.train.fit`,
:mod:`mep_hw.train.observers`).

Randomness comes only from generators seeded by the run's seed: the weight initialisation from
``seed``, the shuffle (and β signs) of epoch e from a generator seeded by (seed, e), device
tiles and read noise from generators seeded by ``seed``. A run therefore resumes from the
checkpoint of its last finished epoch exactly as if it had never stopped, and the same seed gives
the same metrics on the same machine.

A run folder holds ``config.toml`` (the full configuration), ``checkpoint.pt`` (weights, the
device store, optimizer and schedule state, history, the trace interval in progress; rewritten
atomically after every epoch) and ``metrics.json`` (written when the run starts, after every
epoch, and when the run is interrupted, diverges or fails, with ``status`` saying which: one of
:data:`mep_hw.train.guards.STATUSES`), and with ``--trace-every`` an HDF5 ``trace.h5`` (see
:mod:`mep_hw.train.tracing` and :mod:`mep_hw.io.trace`). What a resume may change, and when a
run is stopped as ``diverged`` or ``not_settling``: :mod:`mep_hw.train.guards`. A filesystem
failure (a read-only folder, a full disk) is a :class:`~mep_hw.errors.StorageError`; the files
written before it are kept.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from mep_hw.ep import ep_gradients, free_phase
from mep_hw.errors import ConfigError, DivergedError, MepHwError, SettleError
from mep_hw.hw import build_store
from mep_hw.io import Dataset, load_dataset
from mep_hw.io.runs import ensure_dir, write_toml
from mep_hw.model import LayeredHopfield, build_network, one_hot
from mep_hw.settle import SettleStatus, remedy
from mep_hw.train.augment import augment_batch, parse_augment
from mep_hw.train.config import TrainConfig
from mep_hw.train.cost import CostAccumulator, learning_rule_neuron_ops
from mep_hw.train.fit import epoch_generator, fit, iterate_batches
from mep_hw.train.guards import CosineCycles, GuardObserver, RunGuard, cosine_cycle, plan_resume
from mep_hw.train.health import SettleHealthObserver
from mep_hw.train.observers import (
    CHECKPOINT_FORMAT, CheckpointObserver, CostObserver, MetricsObserver, ProgressObserver, StepOut, TraceObserver,
)
from mep_hw.train.regimes import Estimate, build_regime
from mep_hw.train.tracing import StepTotals, batch_sums, open_trace, parse_trace_every

__all__ = ["EpochStats", "TrainResult", "EPTrainer", "build_model", "train", "evaluate", "epoch_generator", "iterate_batches"]

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
    test_steps_mean: float = 0.0  # free-phase steps per test sample
    test_time_mean: float = 0.0  # free-phase settle time per test sample, units of τ


class TrainResult(NamedTuple):
    run_dir: Path
    test_accuracy: float
    history: tuple[EpochStats, ...]
    status: str  # completed (a run that stops otherwise raises: see mep_hw.train.guards)


@torch.no_grad()
def evaluate(model: LayeredHopfield, x: Tensor, y: Tensor, cfg: TrainConfig) -> tuple[float, float, float, float]:
    """(accuracy, mean cost, mean free-phase steps, mean free-phase settle time in τ) of the free
    phase on (x, y), reading the weights through the model's store."""
    ep = cfg.ep_config()
    correct, loss, steps, stime = 0, 0.0, 0, 0.0
    for i in range(0, x.shape[0], cfg.eval_batch_size):
        xb, yb = x[i : i + cfg.eval_batch_size], y[i : i + cfg.eval_batch_size]
        res = free_phase(model, xb, ep, check=False)
        correct += int((model.logits(res.states).argmax(1) == yb).sum())
        loss += float(model.cost_fn(res.states, one_hot(yb, model.layers[-1], x.dtype)).sum())
        steps += int(res.steps.sum())
        stime += float(res.time.sum())
    n = max(1, x.shape[0])
    return correct / n, loss / n, steps / n, stime / n


class EPTrainer:
    """One EP training step per batch (estimate, then the regime's update) and the evaluation
    of each epoch; keeps the epoch's sums."""

    def __init__(self, model: LayeredHopfield, cfg: TrainConfig, regime, x_test: Tensor, y_test: Tensor):
        self.model, self.cfg, self.regime = model, cfg, regime
        self.x_test, self.y_test = x_test, y_test
        ep_cfg = cfg.ep_config()
        if model.noise_floor(abs(float(cfg.beta))) > 0:
            # on noisy hardware the steady-state test can hold before a nudge has reached the hidden
            # layers: let every nudged settle take at least one step per layer (and one more)
            ep_cfg = dataclasses.replace(ep_cfg, nudged=dataclasses.replace(
                ep_cfg.nudged, min_steps=min(model.n_states + 1, ep_cfg.nudged.max_steps)))
        self.ep_cfg = ep_cfg
        self.totals = StepTotals()
        self.n_out = model.layers[-1]
        self._checked: set[int] = set()  # ids of the data tensors validated once (see step)

    def begin_epoch(self, epoch: int) -> None:
        self.totals.reset()
        self.counts0 = self.counts()

    def step(self, x: Tensor, y: Tensor, generator: torch.Generator) -> StepOut:
        target = one_hot(y, self.n_out, x.dtype)
        # no host reads in the step: the batch was validated with its data set (check_data), and
        # samples that end non-finite are counted on the device and raise at the epoch's end
        if self.regime.needs_grads:
            res = ep_gradients(self.model, x, target, self.ep_cfg, generator=generator, check=False)
            est = Estimate(res.grads)
        else:  # in-array: the host forms no contrast; the phases' activities drive the array
            res = ep_gradients(self.model, x, target, self.ep_cfg, generator=generator, contrast=_no_contrast,
                               check=False)
            (sa, ba), (sb, bb) = res.phases
            m = self.model
            est = Estimate(None, ((1.0, m.hebbian_terms(x, sa, ba, target)), (-1.0, m.hebbian_terms(x, sb, bb, target))),
                           1.0 / ((ba - bb) * x.shape[0]), signed=m.cost == "ce")
        self.regime.apply(est)
        sums = batch_sums(res, y)
        self.totals.add(sums)
        return StepOut(x, res, sums, self.regime.host_flops(x.shape[0]), self.regime.neuron_ops(x.shape[0]))

    def counts(self):
        """Operations of every array of the run: the store's, and a regime's own (tiki-taka's fast arrays)."""
        c = self.model.store.counts()
        return c + self.regime.counts() if hasattr(self.regime, "counts") else c

    def check_data(self, x: Tensor, y: Tensor) -> None:
        """Validate the training data once (shapes, finite values), so that no step reads it on
        the host."""
        self.model.check_batch(x[:1], one_hot(y[:1], self.n_out, x.dtype))
        self.model.check_batch(x)  # finite values of the whole set: one host read

    def end_epoch(self, epoch: int, seconds: float) -> EpochStats:
        bad = self.totals.nonfinite()  # the epoch's one read of the step sums
        if bad:
            raise SettleError(
                f"epoch {epoch}: {bad} settles (free and nudged phases, counted per sample) became non-finite "
                f"(NaN or inf; status NONFINITE): {_NONFINITE_REMEDY}"
            )
        d = self.counts() - self.counts0
        t1 = time.perf_counter()
        test_acc, test_loss, test_steps, test_time = evaluate(self.model, self.x_test, self.y_test, self.cfg)
        t = self.totals.sums
        n, n_nudged = max(1.0, t["n"]), max(1.0, t["n_nudged"])
        return EpochStats(
            epoch=epoch, train_loss=t["loss"] / n, train_accuracy=t["correct"] / n,
            test_loss=test_loss, test_accuracy=test_acc, epoch_seconds=seconds, eval_seconds=time.perf_counter() - t1,
            free_steps_mean=t["free_steps"] / n, nudged_steps_mean=t["nudged_steps"] / n_nudged,
            free_step_limit_frac=t["free_limit"] / n, nudged_step_limit_frac=t["nudged_limit"] / n_nudged,
            lr=self.regime.lr, pulses_up=d.pulses_up, pulses_down=d.pulses_down, refreshes=d.refreshes,
            free_time_mean=t["free_time"] / n, nudged_time_mean=t["nudged_time"] / n_nudged,
            test_steps_mean=test_steps, test_time_mean=test_time,
        )


_NONFINITE_REMEDY = remedy(SettleStatus.NONFINITE)


def _no_contrast(*args):
    return None


def build_model(cfg: TrainConfig, input_shape, n_classes: int):
    """The network of ``cfg`` (``arch`` or ``layers``, activation, cost, seed, dtype, device) for
    data of ``input_shape`` (an int: flat inputs) and ``n_classes`` classes, on exact weights."""
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    return build_network(arch=cfg.arch, layers=cfg.layers, input_shape=shape, n_classes=n_classes,
                         activation=cfg.activation, cost=cfg.cost, seed=cfg.seed, dtype=cfg.torch_dtype,
                         device=cfg.torch_device, dataset=cfg.dataset)


def _tensors(ds: Dataset, cfg: TrainConfig):
    dev, dt = cfg.torch_device, cfg.torch_dtype
    return (
        torch.as_tensor(ds.x_train, dtype=dt, device=dev),
        torch.as_tensor(ds.y_train, device=dev),
        torch.as_tensor(ds.x_test, dtype=dt, device=dev),
        torch.as_tensor(ds.y_test, device=dev),
    )


def batch_transform(cfg: TrainConfig, ds: Dataset):
    """``transform(x, generator)`` for :func:`fit`: the run's ``--augment`` of a training batch
    (None without augmentation). ConfigError if the data are not images."""
    aug = parse_augment(cfg.augment)
    if not aug.active:
        return None
    if not ds.image_shape or len(ds.image_shape) != 3:
        raise ConfigError(
            f"augment={cfg.augment!r} transforms images, but dataset {cfg.dataset!r} holds flat vectors "
            f"({ds.input_dim} features); use --augment none, or an image dataset (mnist, fashion-mnist, cifar10, digits)"
        )
    shape = tuple(int(v) for v in ds.image_shape)
    return lambda x, gen: augment_batch(x, aug, shape, gen)


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    explicit: set[str] | None = None,
    progress: bool | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    dataset: Dataset | None = None,
    card=None,
) -> TrainResult:
    """Train with EP and write the run folder (see the module docstring).

    ``resume`` continues the run in ``run_dir`` from its last checkpoint; ``explicit`` names the
    options the user gave, which must agree with the stored config. ``progress`` shows a bar
    (None: only on a terminal). ``on_batch(epoch, batch)`` is called after every step.
    ``dataset`` overrides loading by name (for tests and embedding). ``card`` (a
    :class:`~mep_hw.hw.Card`, e.g. one built in Python) holds the weights instead of the card
    ``cfg.device`` names; its parameters are recorded in metrics.json and the trace.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT_FILE
    state = None
    plan = None
    if resume:
        # [rel11: resume] continue exactly or refuse with the reason; epochs/data_dir changes recorded
        plan = plan_resume(run_dir, {n: getattr(cfg, n) for n in sorted(explicit or ())})
        cfg, state = plan.config, plan.state
        if state is not None and state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(
                f"{ckpt_path} was written by another mep_hw version (checkpoint format {state.get('format', 1)}, this "
                f"one reads format {CHECKPOINT_FORMAT}), so the run cannot be continued exactly; start a new run with "
                "a different --out (the old folder is left as it is)"
            )
    elif (run_dir / CONFIG_FILE).exists() or ckpt_path.exists():
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose a new --out "
            "(nothing was overwritten)"
        )

    ds = dataset or load_dataset(cfg.dataset, cfg.data_dir, limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    transform = batch_transform(cfg, ds)  # before anything is written: flat data refuse --augment
    model = build_model(cfg, ds.input_shape, ds.n_classes)
    cfg = cfg.replace(layers=model.layers)
    card = card if card is not None else cfg.card()
    in_array = cfg.update != "host"
    if in_array and card is None:
        raise ConfigError(f"--update {cfg.update} applies the update in the array: give the device with --device")
    store = build_store(card, list(model.weights), cfg.seed, biases=list(model.biases) if in_array else None)
    model.use_store(store)
    ensure_dir(run_dir)  # [rel11] a file or a read-only folder as --out: StorageError
    write_toml(run_dir / CONFIG_FILE, cfg.to_dict())

    xtr, ytr, xte, yte = _tensors(ds, cfg)
    n_batches = -(-xtr.shape[0] // cfg.batch_size)
    regime = build_regime(model, cfg, cosine_cycle(cfg, 1)[1] * n_batches)
    from mep_hw.train.backprop import BPTrainer

    trainer = (EPTrainer if cfg.method == "ep" else BPTrainer)(model, cfg, regime, xte, yte)
    if hasattr(trainer, "check_data"):
        trainer.check_data(xtr, ytr)
    cost = CostAccumulator(phases=1 + (2 if cfg.estimator == "symmetric" else 1))
    history: list[EpochStats] = []
    start = 1
    if state is not None:
        model.load_state_dict(state["model"])
        if state["hardware"] is not None:
            store.load_state_dict(state["hardware"])
        regime.load_state_dict(state["regime"])
        cost.load_state_dict(state.get("cost"), learning_rule_ops=learning_rule_neuron_ops(cfg, model))
        history = [EpochStats(**h) for h in state["history"]]
        start = plan.start_epoch

    # [rel11: health] stops the run as diverged / not_settling; warns on step-limit hits
    guard = RunGuard(names=[f"W{k}" for k in range(len(model.weights))] + [f"b{k}" for k in range(len(model.biases))],
                     max_steps=cfg.max_steps, nudged_max_steps=cfg.nudged_max_steps,
                     warnings=plan.warnings if plan is not None else ())

    def static() -> dict:
        return {
            "config": cfg.to_dict(),
            "device": card.to_dict() if card is not None else None,
            "pulses": store.layer_info() if card is not None else None,
            "cost": cost.summary(card, cfg, model) if card is not None else None,
            "warnings": guard.warnings,
            "resumes": plan.resumes if plan is not None else [],
            "settle_health": health.summary(),
        }

    trace = None

    def checkpoint() -> dict:
        return {"model": model.state_dict(), "hardware": store.state_dict() if card is not None else None,
                "regime": regime.state_dict(), "cost": cost.state_dict(),
                "trace": trace.state_dict() if trace is not None else None}

    # order matters: the guard first (a diverged step is not recorded), the trace's epoch row and
    # the cost before the checkpoint, metrics.json after it (it records only checkpointed epochs)
    observers = [GuardObserver(guard, [*model.weights, *model.biases], xtr.shape[0], n_batches),
                 CosineCycles(regime, cfg, n_batches)]
    if card is not None:
        observers.append(CostObserver(cost, trainer.counts, xtr.shape[0], xte.shape[0]))
    health = SettleHealthObserver(cfg)  # per-epoch settle health (residuals at the limit), in metrics.json
    observers.append(health)
    every = parse_trace_every(cfg.trace_every)
    if every:
        tracer = open_trace(run_dir, cfg, card, resume_epoch=(start - 1) if resume else None, steps_per_epoch=n_batches)
        trace = TraceObserver(tracer, every, model, n_batches, extra=getattr(regime, "trace_values", None), epochs=cfg.epochs)
        if state is not None:
            trace.load_state_dict(state.get("trace"))  # [rel11] the interval in progress resumes
        if start == 1:
            trace.record_initial()
        observers.append(trace)
    observers.append(CheckpointObserver(ckpt_path, checkpoint))
    metrics = MetricsObserver(run_dir / METRICS_FILE, static, history, cfg.epochs)
    observers.append(metrics)
    if progress is not False:
        observers.append(ProgressObserver(cfg.epochs))

    try:
        metrics.write("running")
    except BaseException:
        if trace is not None:
            trace.tracer.close()
        raise
    history = fit(trainer, xtr, ytr, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, start=start,
                  history=history, observers=observers, on_batch=on_batch, progress=progress, transform=transform,
                  stop_errors={SettleError: "diverged", DivergedError: "diverged", MepHwError: "failed"})
    return TrainResult(run_dir, history[-1].test_accuracy, tuple(history), "completed")

"""The run configuration: one frozen dataclass whose fields are the ``mep-hw train`` options.

Each field's long option is its name with dashes (``batch_size`` → ``--batch-size``); the same
names are the keys of ``config.toml`` in a run folder and of the ``[base]`` and ``[axes]``
tables of a sweep. Validation happens here, at the entry point, with ConfigError messages that
name the option, the value and the valid range.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from mep_hw.ep import ESTIMATORS, INITS, EPConfig
from mep_hw.errors import ConfigError
from mep_hw.io import DATASETS
from mep_hw.model import ACTIVATIONS, COSTS, HOLOMORPHIC_ACTIVATIONS, ConvLayer, format_arch, parse_arch
from mep_hw.hw.crossbar import PULSE_APPLICATIONS, CrossbarDevice
from mep_hw.hw.pulses import SAMPLINGS
from mep_hw.optimizers.host import HOST_OPTIMIZERS
from mep_hw.settle import SOLVER_NAMES as SOLVERS, SWEEPS, SettleConfig  # tableaus, sweeps and backends (brian2)
from mep_hw.settle import SOLVERS as ODE_SOLVERS
from mep_hw.train.augment import parse_augment

__all__ = ["TrainConfig", "OPTIMIZERS", "UPDATES", "SCHEDULES", "DTYPES", "DEFAULT_DT", "SETTLE_TIME", "parse_layers", "parse_cycles",
           "option_names", "layer_lr_scales"]

OPTIMIZERS = HOST_OPTIMIZERS
UPDATES = ("host", "analog", "tiki-taka")
METHODS = ("ep", "backprop")
PULSE_PHASES = ("separate", "signed")
# The settle defaults per activation (measured by mep_hw.benchmarks.settle_dt; docs/settle.md):
# the solver step dt, and the settle-time budgets (in τ) that the step limits default to,
# max_steps = free time / dt and nudged_max_steps = nudged time / dt, so that a smaller step gets
# proportionally more steps. The hard sigmoid's field is the rate form clip(d) − s, whose
# Jacobian is the coupling alone: Euler at 1 converges whenever the coupling is contractive. The
# sigmoid's is −∇E, whose Hessian carries −ρ''(s)d ≈ 4|s| on the diagonal at a fixed point: units
# driven to |s| ≈ 1 (an MSE output at its target) need dt < 2/(1 + 4|s| + coupling), and Euler at
# 1 (or 0.5 on larger weights) falls into a cycle instead; its −β phase (output stiffness 1 − β)
# relaxes at rate ~ 1 − β and needs ~ 35 τ on average at β = 0.5, atol 1e-5.
DEFAULT_DT = {"hard_sigmoid": 1.0, "sigmoid": 0.25}
# defaults of the update regimes (measured: docs/learning-in-array.md): the host optimizer's rate, the
# in-array SGD rate per method, pulse slots per train, and the fast array's rate of Tiki-Taka per --lr
HOST_LR = 1e-3
# Adam's default rate for a convolutional net (one rate for all its weights): measured on 10k
# images, 3 epochs, conv:16:5,pool:2,conv:32:5,pool:2,fc:10, ce (benchmarks/results/conv_lr_10k.json):
# MNIST 88.25 % at 0.003, 96.30 % at 0.03; Fashion-MNIST 73.05 / 78.65 / 83.15 / 83.40 % at
# 0.003 / 0.01 / 0.03 / 0.05; full Fashion-MNIST, 10 epochs, at 0.03: 89.65 % (86.55 % at 0.003)
CONV_HOST_LR = 0.03
IN_ARRAY_LR = {"ep": 0.1, "backprop": 0.05}
PULSE_BL = {"host": 31, "analog": 31, "tiki-taka": 255}
FAST_LR_FACTOR = 20.0
SETTLE_TIME = {"hard_sigmoid": (100.0, 20.0), "sigmoid": (100.0, 100.0)}  # (free, nudged) in τ
SCHEDULES = ("cosine", "constant")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def parse_layers(value) -> tuple[int, ...] | None:
    """Layer sizes from "784,500,10", a list of ints, or None."""
    if value is None:
        return None
    given = value
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise ConfigError(f"layers={given!r} must be comma-separated integers, e.g. 784,500,10") from None
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"layers={given!r} must be a list of integers, e.g. [784, 500, 10]") from None
    if len(out) < 2 or any(n < 1 for n in out) or any(isinstance(v, bool) for v in value):
        raise ConfigError(f"layers={given!r} needs at least an input and an output size, all ≥ 1 (e.g. 784,500,10)")
    return out


def parse_cycles(value) -> tuple[int, ...] | None:
    """Cosine cycle lengths in epochs from "2,2", a list of ints, or None."""
    if value is None:
        return None
    given = value
    try:
        out = tuple(int(v) for v in (value.replace(" ", "").split(",") if isinstance(value, str) else value) if v != "")
    except (TypeError, ValueError):
        raise ConfigError(f"cosine_cycles={given!r} must be comma-separated integers, e.g. 5,10") from None
    if not out or any(n < 1 for n in out) or (not isinstance(value, str) and any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
        raise ConfigError(f"cosine_cycles={given!r} must be one or more whole numbers of epochs ≥ 1, e.g. 5,10")
    return out


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything needed to reproduce an EP training run."""

    dataset: str = _opt("digits", "dataset to train on", choices=DATASETS)
    data_dir: str | None = _opt(None, "folder with the IDX files (else $MEP_HW_DATA, else download into the cache)", metavar="DIR")
    layers: tuple[int, ...] | None = _opt(
        None, "layer sizes from input to output, e.g. 784,500,10 (default: input,500,classes)", metavar="N,N,…"
    )
    arch: str | None = _opt(
        None, "network architecture instead of --layers, e.g. conv:32:5,pool:2,conv:64:5,pool:2,fc:10 "
        "(conv:C:K[:P|same], pool:S / avgpool:S after a conv, fc:N; ends with fc:<classes>)", metavar="SPEC",
    )
    activation: str = _opt("hard_sigmoid", "activation ρ of the Hopfield energy", choices=tuple(ACTIVATIONS))
    cost: str = _opt("mse", "cost: mse on the output state, or ce (softmax cross-entropy readout)", choices=COSTS)
    epochs: int = _opt(15, "number of passes over the training set", metavar="N")
    batch_size: int = _opt(100, "minibatch size", metavar="B")
    optimizer: str = _opt(
        "adam", "host optimizer that applies the EP gradient (muon/dion: Muon or Dion on the weight matrices, "
        "Adam at lr/10 on the biases, momentum 0.95; use --lr 0.02)", choices=OPTIMIZERS)
    lr: float | None = _opt(
        None, "learning rate: of the host optimizer (default 1e-3; Adam on a conv net 0.03), or with --update analog / tiki-taka the in-array "
        "SGD rate (default 0.1 for EP, 0.05 for backprop: docs/learning-in-array.md)", metavar="F")
    lr_width: int | None = _opt(
        125, "per-layer learning rates: a weight matrix between two state layers (or the readout) whose wider side n "
        "exceeds this width gets lr·lr_width/n; the input matrix and the biases get lr (0: one lr for all)", metavar="N")
    momentum: float = _opt(0.9, "momentum of sgd", metavar="F")
    weight_decay: float = _opt(0.0, "L2 weight decay of the host optimizer", metavar="F")
    schedule: str = _opt("cosine", "learning-rate schedule over the whole run", choices=SCHEDULES)
    cosine_cycles: tuple[int, ...] | None = _opt(
        None, "cosine schedule restarted from lr after each of these many epochs (SGDR warm restarts); epochs past "
        "their sum form one last cycle. Written by --resume --epochs to record how the schedule was extended", metavar="N,N,…",
    )
    beta: float = _opt(0.5, "nudging strength β > 0", metavar="F")
    estimator: str | None = _opt(
        None, "EP estimator: one-sided (+β), symmetric (±β) or holomorphic (4 complex β on a circle; needs "
        "--activation sigmoid); default: one-sided, symmetric on a --device whose reads are noisy (docs/ep.md, "
        "\"Choosing the defaults\")", choices=ESTIMATORS)
    random_sign: bool = _opt(False, "one-sided estimator: draw the sign of β per batch")
    solver: str = _opt(
        "auto", "settle solver; auto: the block sweep for a box activation (hard_sigmoid; dense or conv), "
        "else euler", choices=(*SOLVERS, "auto"))
    omega: float | None = _opt(
        None, "block solver: relaxation of each half-sweep, in (0, 2) (default: 1.4 for one-sided EP with two or more hidden "
        "layers; with one hidden layer 1, the output layer's half-sweep 1.3; else 1; see block_omegas)", metavar="F")
    omega_first: float | None = _opt(
        None, "block solver: relaxation of the parity updated first only (the output layer's; in a conv net the one "
        "below a max-pooled conv if only it depends on itself), in (0, 2) (default: --omega, or as above)",
        metavar="F")
    dt: float | None = _opt(
        None, "solver step (first step of adaptive solvers), in units of τ; default per activation: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_DT.items()) + " (recorded in config.toml)", metavar="F")
    atol: float | None = _opt(
        None, "free phase: absolute steady-state tolerance on rms(ds/dt) (default: tied to the estimator, see "
        "free_tolerance: one-sided with the block solver the nudged tolerance, else min(nudged, 2e-5·β); "
        "symmetric and holomorphic 1e-4)", metavar="F")
    rtol: float | None = _opt(
        None, "free phase: tolerance relative to rms(s) (default: one-sided nudged_rtol; symmetric and holomorphic "
        "1e-2)", metavar="F")
    max_steps: int | None = _opt(
        None, "free phase: step limit (default: a settle time / dt; "
        + ", ".join(f"{k} {v[0]:g} τ" for k, v in SETTLE_TIME.items()) + ")", metavar="N")
    nudged_atol: float | None = _opt(
        None, "nudged phases: absolute steady-state tolerance (default: see nudged_tolerance; one-sided with the "
        "block solver 2e-4·β, else 1e-5)", metavar="F")
    nudged_rtol: float = _opt(0.0, "nudged phases: relative steady-state tolerance", metavar="F")
    nudged_max_steps: int | None = _opt(
        None, "nudged phases: step limit (samples past it are counted, not fatal; default: a settle time / dt; "
        + ", ".join(f"{k} {v[1]:g} τ" for k, v in SETTLE_TIME.items()) + ")", metavar="N")
    init: str = _opt("forward", "initial state of the free phase", choices=INITS)
    seed: int = _opt(0, "seed of every random generator of the run", metavar="S")
    limit_train: int | None = _opt(None, "use only the first N training samples", metavar="N")
    limit_test: int | None = _opt(None, "use only the first N test samples", metavar="N")
    augment: str = _opt(
        "none", "augment the training images: none, or a comma list of flip (left-right mirror, p = 1/2) and "
        "shift:N (translate by up to N pixels each way, zero fill), e.g. flip,shift:2; image datasets only",
        metavar="SPEC")
    eval_batch_size: int = _opt(1000, "batch size of evaluation", metavar="B")
    torch_device: str = _opt("cpu", "torch device: cpu, cuda, cuda:1, …", metavar="DEV")
    dtype: str = _opt("float32", "floating-point type of states and weights", choices=tuple(DTYPES))
    device: str | None = _opt(
        None, "device card the weights live on: a shipped name (mep-hw devices list) or a .toml path; default: ideal weights",
        metavar="NAME_OR_PATH",
    )
    set: dict = field(
        default_factory=dict,
        metadata={"help": "override a device-card field, e.g. --set levels=16 --set read_noise=0.02 (repeatable)",
                  "metavar": "FIELD=VALUE", "cli": "kv"},
    )
    spectral_gamma: float | None = _opt(
        None, "after every step bound the coupling operator of the (held) weights by this γ", metavar="F"
    )
    trace_every: str | None = _opt(
        None, "write RUN_DIR/trace.h5 (weights, conductances, pulses, settle stats, energies) every N optimizer "
        "steps (200) or N epochs (1epoch)", metavar="N[epoch]",
    )
    method: str = _opt(
        "ep", "learning rule: ep (equilibrium propagation on the layered Hopfield network), or backprop (the same "
        "layers as an MLP on the same weight store: forward through the arrays, backward through their transpose "
        "reads; a baseline on identical device physics)", choices=METHODS)
    update: str = _opt(
        "host", "update regime: host (host optimizer + device write + error feedback), analog (the array applies "
        "EP's Hebbian outer products itself by pulse coincidence, --lr is the SGD rate), tiki-taka (in-array "
        "updates to a fast array, transferred to the slow array through a digital buffer)", choices=UPDATES)
    pulse_bl: int | None = _opt(
        None, "analog / tiki-taka: pulse slots per row and column train (BL; default 31 for analog, 255 for tiki-taka, "
        "whose fast array takes up to ~150 pulses per cell and step)", metavar="N")
    pulse_sampling: str = _opt(
        "exact", "analog / tiki-taka: exact (draw the row and column pulse trains and count coincidences) or "
        "marginal (each cell's count from its exact mean and variance, no correlation between cells; ~10x faster)",
        choices=SAMPLINGS)
    pulse_application: str = _opt(
        "per_pulse", "crossbar cards: per_pulse (every device pulse applied one at a time, the reference) or moments "
        "(each device's k pulses of a step at once, drawn from their exact mean and variance, where the step is affine "
        "in G: the linear_step, soft_bounds and NeuroSim exponential cards such as ecram, pcm, reram_taox, fefet; others, and "
        "devices near a bound, stay per pulse; docs/devices.md)",
        choices=PULSE_APPLICATIONS)
    pulse_phases: str = _opt(
        "separate", "EP in the array: separate (each phase's outer products as its own pulse train, the + phase "
        "potentiating and the − phase depressing) or signed (where both phases share the presynaptic activity — the "
        "clamped input of the first layer — one signed train of the postsynaptic difference ρ(s⁺) − ρ(s⁻) instead, "
        "as backprop's update is applied; each neuron holds its first phase's activity and subtracts, counted as "
        "neuron operations; fewer pulses and less pulse noise)", choices=PULSE_PHASES)
    transfer_every: int = _opt(1, "tiki-taka: steps between transfers", metavar="N")
    transfer_columns: int = _opt(
        0, "tiki-taka: columns of the fast array read and transferred per transfer (cycling; 0: all)", metavar="N")
    transfer_lr: float = _opt(
        0.1, "tiki-taka: buffer gain: H += transfer_lr × (column read of A − symmetry point) / slow pulse step",
        metavar="F")
    tt_gamma: float = _opt(0.0, "tiki-taka: the network reads W = C + gamma·A", metavar="F")
    transfer_fast_lr: float | None = _opt(
        None, f"tiki-taka: learning rate of the in-array update of the fast array A (default: {FAST_LR_FACTOR:g} × --lr); "
        "A must move by many of its pulses between reads for its column reads to resolve the update through the ADC",
        metavar="F")
    transfer_max_pulses: int = _opt(10, "tiki-taka: most pulses per cell of the slow array per transfer", metavar="N")
    transfer_momentum: float = _opt(
        0.1, "tiki-taka: after a transfer of n pulses the buffer keeps momentum·n (aihwkit's BufferedTransferCompound "
        "default)", metavar="F")
    transfer_forget: bool = _opt(
        True, "tiki-taka: reset a transferring cell's buffer to momentum·n (aihwkit's forget_buffer, default) instead of "
        "subtracting (1 − momentum)·n")
    transfer_reset: bool | None = _opt(
        None, "tiki-taka: re-program the fast array's read columns to their symmetry point after each transfer "
        "(aihwkit's with_reset_prob = 1; default: on where the card's device has no pull to its symmetry point, e.g. "
        "the ideal card, where A would otherwise integrate the update without a leak and C integrate A)")
    transfer_scaled: bool = _opt(
        True, "tiki-taka: the transfer rate follows the learning-rate schedule, --transfer-lr × lr(t)/lr (aihwkit's "
        "scale_transfer_lr, default); without it a fast array whose rate has decayed keeps its last content, which "
        "every transfer adds to C again")

    def __post_init__(self):
        object.__setattr__(self, "layers", parse_layers(self.layers))
        conv = self.has_convolutions
        if self.estimator is None:  # measured (docs/ep.md): one-sided is the better estimate on exact reads;
            # through noisy reads the free phase stops at the noise floor and only the symmetric contrast
            # cancels its unfinished relaxation
            noisy = self.device is not None and _noisy_reads(self.card())
            # a conv net's free phase (Euler through pooling kinks) does not reach the one-sided
            # estimator's tied tolerance: measured on MNIST (GPU), 97 % of the free settles of
            # conv:16:5,pool:2,conv:32:5,pool:2,fc:10 ended at the 100-step limit and the run
            # guard stopped it; symmetric: 97.8 % after one epoch (docs/conv.md)
            object.__setattr__(self, "estimator", "symmetric" if (noisy or conv) else "one-sided")
        if self.arch is not None:
            specs = parse_arch(self.arch)
            object.__setattr__(self, "arch", format_arch(specs))
            if conv and (self.update != "host" or self.method != "ep"):
                raise ConfigError(
                    f"arch={self.arch!r} has convolutions, which train with --method ep --update host only so far; "
                    "drop --update/--method or use fc layers (--layers)"
                )
            if self.spectral_gamma is not None and conv:
                raise ConfigError(
                    f"spectral_gamma bounds the coupling of weight matrices and does not yet cover convolutions "
                    f"(arch={self.arch!r}); drop --spectral-gamma or use fc layers only"
                )
        object.__setattr__(self, "cosine_cycles", parse_cycles(self.cosine_cycles))  # [rel11]
        object.__setattr__(self, "augment", str(parse_augment(self.augment)))
        for name in ("dataset", "activation", "cost", "optimizer", "schedule", "estimator", "solver", "init", "dtype", "update", "method", "pulse_sampling", "pulse_phases",
                     "pulse_application"):
            choices = _field(name).metadata["choices"]
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not valid; choose one of: {', '.join(choices)}")
        if self.dt is None:  # the stable step of the activation's settle (DEFAULT_DT)
            object.__setattr__(self, "dt", DEFAULT_DT[self.activation])
        _float("dt", self.dt, positive=True)
        for name, steps in zip(("max_steps", "nudged_max_steps"), self.default_steps()):
            if getattr(self, name) is None:  # the activation's settle time at any step
                object.__setattr__(self, name, steps)
        if self.lr is None:  # the regime's rate: Adam's on the host (a conv net's own), plain SGD's in the array
            if self.update != "host":
                lr = IN_ARRAY_LR[self.method]
            elif self.optimizer == "adam" and conv:
                lr = CONV_HOST_LR
            else:
                lr = HOST_LR
            object.__setattr__(self, "lr", lr)
        if self.pulse_bl is None:
            object.__setattr__(self, "pulse_bl", PULSE_BL[self.update])
        for name in ("epochs", "batch_size", "max_steps", "nudged_max_steps", "eval_batch_size", "pulse_bl",
                     "transfer_every", "transfer_max_pulses"):
            _int(name, getattr(self, name), lo=1)
        _int("transfer_columns", self.transfer_columns, lo=0)
        if self.lr_width is not None:
            _int("lr_width", self.lr_width, lo=0)
        _int("seed", self.seed, lo=0)
        for name in ("limit_train", "limit_test"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), lo=1)
        for name in ("lr", "beta", "dt"):
            _float(name, getattr(self, name), positive=True)
        for name in ("omega", "omega_first"):
            om = getattr(self, name)
            if om is None:
                continue
            _float(name, om, positive=True)
            if not 0.0 < om < 2.0:
                raise ConfigError(f"{name}={om} must be a relaxation factor in (0, 2) (1: exact block descent)")
            if om != 1.0 and self.settle_solver != "block":
                raise ConfigError(f"{name}={om:g} relaxes the block solver's sweeps, but the settles use "
                                  f"{self.settle_solver!r}: leave {name} unset, or use --solver block (a layered "
                                  "hard-sigmoid net)")
        for name in ("momentum", "weight_decay", "atol", "rtol", "nudged_atol", "nudged_rtol", "transfer_lr", "tt_gamma"):
            if getattr(self, name) is not None or name not in ("atol", "rtol", "nudged_atol"):
                _float(name, getattr(self, name), positive=False)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum} must be in [0, 1)")
        if self.transfer_reset is None:  # measured (docs/learning-in-array.md): on the ideal card without the
            # reset A has no leak, W = C integrates an integral of the update, 72.8 % on 10k MNIST; with it 85.8 %
            card = self.card() if self.update == "tiki-taka" else None
            object.__setattr__(self, "transfer_reset",
                               card is not None and not card.device.restores_to_symmetry_point)
        for name in ("random_sign", "transfer_forget", "transfer_reset", "transfer_scaled"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.transfer_fast_lr is None and self.update == "tiki-taka":
            object.__setattr__(self, "transfer_fast_lr", FAST_LR_FACTOR * self.lr)
        if self.transfer_fast_lr is not None:
            _float("transfer_fast_lr", self.transfer_fast_lr, positive=True)
        if not 0 <= self.transfer_momentum < 1:
            raise ConfigError(f"transfer_momentum={self.transfer_momentum} must be in [0, 1)")
        try:
            dev = torch.device(self.torch_device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"torch_device={self.torch_device!r} is not a torch device (cpu, cuda, cuda:0, …)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"torch_device={self.torch_device!r} but CUDA is not available here; use --torch-device cpu")
        if self.solver in SWEEPS and ACTIVATIONS[self.activation].box is None:
            raise ConfigError(
                f"solver={self.solver!r} needs an activation with a box (hard_sigmoid), where each layer's "
                f"minimiser given its neighbours is a clip of its drive; with activation={self.activation!r} "
                f"use an ODE solver: {', '.join(ODE_SOLVERS)}"
            )
        self.ep_config()  # validates the settle and EP settings
        if self.cosine_cycles is not None and self.schedule != "cosine":
            raise ConfigError(f"cosine_cycles={','.join(map(str, self.cosine_cycles))} needs --schedule cosine (the schedule is {self.schedule!r})")
        if self.cost == "mse" and self.beta >= 1 and (self.estimator == "symmetric" or self.random_sign):
            # F = E − βC in the −β phase: the output's energy ½(1 − β)s² − s(d − βy) is concave for
            # β > 1 (flat at 1), so that phase has no fixed point inside the box
            raise ConfigError(
                f"beta={self.beta:g} ≥ 1 with the MSE cost and a −β phase ({'random sign' if self.random_sign else 'symmetric estimator'}): "
                "the −β phase's output energy ½(1 − β)s² is then not convex, its settle has no interior fixed point and "
                "the estimate is not EP's gradient; use a small beta (0.05–0.5), or --estimator one-sided without --random-sign"
            )
        if self.estimator == "holomorphic" and self.activation not in HOLOMORPHIC_ACTIVATIONS:
            raise ConfigError(
                f"estimator='holomorphic' settles at complex β and needs a holomorphic activation, but activation="
                f"{self.activation!r} is not one (the hard sigmoid is a clip); use --activation "
                f"{' or '.join(HOLOMORPHIC_ACTIVATIONS)}, or another estimator"
            )
        if not isinstance(self.set, dict):
            raise ConfigError(f"set={self.set!r} must be a table of device-card fields")
        if self.set and not self.device:
            raise ConfigError("--set changes a device card's fields; give the card with --device")
        if self.spectral_gamma is not None:
            _float("spectral_gamma", self.spectral_gamma, positive=True)
        if self.device is not None:
            self.card()  # validates the card and the overrides
        if self.update != "host" and self.device is None:
            raise ConfigError(
                f"--update {self.update} applies the update in the array: give the device with --device "
                "(e.g. --device ecram, or --device ideal for exact pulses)"
            )
        if self.trace_every is not None:
            from mep_hw.train.tracing import parse_trace_every

            object.__setattr__(self, "trace_every", str(self.trace_every).strip())
            parse_trace_every(self.trace_every)

    # ------------------------------------------------------------------ derived configs
    def block_omegas(self) -> tuple[float, float]:
        """The block solver's relaxation factors (first parity's, second parity's): the fields
        where given (``omega`` for both, ``omega_first`` for the output layer's parity); else, for
        the one-sided estimator settled by the block solver on a layered net, 1.4 for both with
        two or more hidden layers and (1.3, 1) with one hidden layer and the MSE output (the output
        layer over-relaxed, the hidden layer set exactly); (1, 1) otherwise (ODE solvers take 1; a −β
        phase, whose F may have several minimisers, is not over-relaxed by default: at ω = 1.6 a
        test net's −β rows settled in another fixed point).

        Over-relaxed red-black sweeps, clip(s_l + ω f_l), have the same fixed points and the same
        steady-state test; they cut the sweeps the slowest sample of a batch needs. Measured
        (one-sided EP, nets trained one epoch on 10k MNIST images, 20 batches of 100, one thread,
        ω interleaved; benchmarks/results/block_omega.json, docs/settle.md "Over-relaxation"):
        784-500-500-10 48.9 → 23.6 sweeps per batch, 56 → 36 ms per EP gradient, cosine with the
        exactly settled estimate 0.99937 → 0.99984 at ω = 1.4 for both parities (the output
        parity alone: 40.9 sweeps at 1.5); 784-500-500-500-10 64.8 → 36.5 sweeps, 137 → 97 ms,
        0.9946 → 0.9994; 784-500-10 12.3 → 9.4 sweeps with the output layer alone at 1.3, whose
        sweeps stay as cheap as exact ones (both parities at 1.4: 15.0 sweeps)."""
        if self.omega is not None or self.omega_first is not None:
            second = 1.0 if self.omega is None else float(self.omega)
            return (second if self.omega_first is None else float(self.omega_first), second)
        if self.settle_solver == "block" and self.estimator == "one-sided" and self.arch is None:
            depth = len(self.layers or ())
            if depth >= 4:
                return (1.4, 1.4)
            if depth == 3 and self.cost == "mse":  # (a CE net of one hidden layer has one state layer)
                return (1.3, 1.0)
        return (1.0, 1.0)

    def nudged_tolerance(self) -> float:
        """Absolute tolerance of the nudged phases: the field where given; else 2e-4·β (1e-4 at
        β = 0.5) for the one-sided estimator settled by the block solver, 1e-5 otherwise.

        With the block solver both one-sided phases stop at the same tolerance, and their
        unfinished relaxations (the same slow modes) largely cancel in the difference: measured
        on MNIST nets trained 2 epochs on 10k images (cosine with the EP gradient of phases
        settled to 1e-9; benchmarks/results/ep_tolerance.json), 1e-4 in both phases against the
        previous (free 1e-5, nudged 1e-5): 784-500-10 0.99995 vs 1.00000 with 30 % fewer
        sweeps per batch; 784-500-500-10 0.99866 vs 0.99952, 32 % fewer; 784-500-500-500-10
        0.9667 vs 0.9733, 28 % fewer (free 1e-4 with nudged 1e-5 is worse than both: 0.9916 on
        784-500-500-10). The ODE solvers keep 1e-5 (the earlier measurements, docs/ep.md)."""
        if self.nudged_atol is not None:
            return self.nudged_atol
        if self.estimator == "one-sided" and self.settle_solver == "block" and self.arch is None:  # measured on dense nets
            return 2e-4 * self.beta
        return 1e-5

    def free_tolerance(self) -> tuple[float, float]:
        """(atol, rtol) of the free phase: the fields where given, else tied to the estimator.

        The one-sided estimate [∂F/∂θ(s^β) − ∂F/∂θ(s⁰)]/β divides the free state's error by β, so
        its free phase must be settled as tightly as the nudged one that it is subtracted from,
        and tighter as β shrinks: atol = min(nudged, 2e-5·β) (= 1e-5 at β = 0.5) with an ODE
        solver, atol = the nudged tolerance (2e-4·β) with the block solver (see
        :meth:`nudged_tolerance`), rtol = nudged_rtol. The symmetric and holomorphic estimates difference nudged
        states only; the free state is their starting point, so a loose test suffices while
        the nudged phases converge: atol = 1e-4, rtol = 1e-2. Measured gradient cosines against
        the implicit gradient: docs/ep.md, "Tolerances of the phases"."""
        if self.estimator == "one-sided":
            nud = self.nudged_tolerance()
            tied = (nud if (self.settle_solver == "block" and self.arch is None) else min(nud, 2e-5 * self.beta),
                    self.nudged_rtol)
        else:
            tied = (1e-4, 1e-2)
        return (tied[0] if self.atol is None else self.atol, tied[1] if self.rtol is None else self.rtol)

    def ep_config(self) -> EPConfig:
        atol, rtol = self.free_tolerance()
        om1, om = self.block_omegas()
        free = SettleConfig(solver=self.settle_solver, dt=self.dt, atol=atol, rtol=rtol, max_steps=self.max_steps, omega=om,
                            omega_first=om1)
        nudged = SettleConfig(
            solver=self.settle_solver, dt=self.dt, atol=self.nudged_tolerance(), rtol=self.nudged_rtol,
            max_steps=self.nudged_max_steps, omega=om, omega_first=om1
        )
        return EPConfig(
            beta=self.beta, estimator=self.estimator, random_sign=self.random_sign, init=self.init, free=free, nudged=nudged
        )

    def param_groups(self, model) -> list[dict]:
        """The host optimizer's parameter groups for ``model``: weight matrix l at lr·s_l with s_l
        from :func:`layer_lr_scales` on the network's state sizes, every bias at lr (one group at
        lr with ``lr_width = 0``, or for a network whose weights are not one matrix per pair of
        layers). Pass them where the optimizer takes its parameters
        (``torch.optim.Adam(cfg.param_groups(model), lr=cfg.lr)``).

        A conv net's kernels are held as (C_out, C_in·k·k) matrices and take the same rule on its
        state sizes: on ``conv:32:5,pool:2,conv:64:5,pool:2,fc:10`` (states 4608, 1024) the
        second kernel gets lr·125/4608 and the readout lr·125/1024. Measured against other
        choices (Fashion-MNIST, 10k images, 3 epochs; benchmarks/results/conv_fashion_probes_10k.json,
        docs/conv.md): one group at lr stops learning (11.5 % vs 63.6 % after one epoch on 2000
        images); the second kernel at 125/fan_in = 125/800 or at 0.08 learns slower (66.7 vs
        78.85 % after one epoch; 79.85 vs 84.75 % after two), at half the rule's rate too
        (85.85 vs 86.60 % after three). Layers after the second pooled conv layer count the
        widest state below them (``layer_lr_scales(conv=True)``): at their two sides' rate a
        hidden fc or a third conv layer stalls the net."""
        dense = len(model.layers) == len(model.weights) + 1 and all(w.ndim == 2 for w in model.weights)
        if not dense or not self.lr_width:
            return [{"params": list(model.param_list()), "lr": self.lr}]
        scales = layer_lr_scales(model.layers, model.cost, self.lr_width, conv=self.has_convolutions)
        groups = [{"params": [w], "lr": self.lr * k} for w, k in zip(model.weights, scales)]
        return groups + [{"params": list(model.biases), "lr": self.lr}]

    def card(self):
        """The device card with the ``set`` overrides applied (None without ``device``)."""
        if self.device is None:
            return None
        from mep_hw.hw import load_card

        card = load_card(self.device, self.set)
        if self.pulse_application != "per_pulse" and isinstance(card.device, CrossbarDevice):
            card = card._replace(device=dataclasses.replace(card.device, pulse_application=self.pulse_application))
        return card

    @property
    def has_convolutions(self) -> bool:
        """Whether ``arch`` declares a conv layer (its defaults and learning rates differ)."""
        return self.arch is not None and any(isinstance(L, ConvLayer) for L in parse_arch(self.arch))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    # ------------------------------------------------------------------ (de)serialisation
    @property
    def settle_solver(self) -> str:
        """The solver the settles use: ``solver``, with ``auto`` resolved to ``block`` (red-black
        block coordinate descent: the ODE's fixed points in fewer sweeps, measured faster at equal
        accuracy on dense and convolutional nets, docs/settle.md) for a box activation, and to
        ``euler`` otherwise (sigmoid: no closed-form block update; the holomorphic estimator, whose
        complex states the block sweep does not take)."""
        if self.solver != "auto":
            return self.solver
        box = ACTIVATIONS[self.activation].box is not None
        return "block" if box and self.estimator != "holomorphic" else "euler"

    def to_dict(self) -> dict[str, Any]:
        """Plain values, None dropped (TOML has no null), layers as a list."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or (isinstance(v, dict) and not v):
                continue
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        unknown = sorted(set(d) - set(option_names()))
        if unknown:
            raise ConfigError(
                f"{source}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(option_names())}"
            )
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes``. A ``dt`` at the old activation's default follows a changed
        ``activation`` to the new one's, unless ``dt`` is given too; step limits at their
        budget for the old dt follow a changed dt, unless given too."""
        if "activation" in changes and "dt" not in changes and self.dt == DEFAULT_DT.get(self.activation):
            changes["dt"] = None
        if "dt" in changes or "activation" in changes:
            for name, steps in zip(("max_steps", "nudged_max_steps"), self.default_steps()):
                if name not in changes and getattr(self, name) == steps:
                    changes[name] = None
        return dataclasses.replace(self, **changes)

    def default_steps(self) -> tuple[int, int]:
        """The (free, nudged) step limits that default to the activation's settle times / dt."""
        return tuple(max(1, round(tau / self.dt)) for tau in SETTLE_TIME[self.activation])


def layer_lr_scales(layers, cost: str, lr_width: int | None, *, conv: bool = False) -> tuple[float, ...]:
    """Learning-rate multiplier of each weight matrix of a layered Hopfield network.

    An Adam step moves every weight by about lr, and the presynaptic states of a hard-sigmoid
    network are ≥ 0, so a step moves a unit's total input by up to lr·n·mean(ρ) for n inputs: it
    grows with the width. Between two state layers the matrix is read both ways (W ρ(s_l) up,
    Wᵀ ρ(s_{l+1}) down), so the wider side counts. Matrices between state layers whose wider
    side n exceeds ``lr_width`` get ``lr_width / n`` (the readout of a ``ce`` cost: its fan-in);
    the input matrix keeps 1 (its fan-in is the data's). This is μP's Adam scaling of hidden and
    output weights (Yang et al. 2021, Tensor Programs V), capped at 1 (no matrix steps faster than
    lr). Measured (784-2000-2000-10, MSE, 40 Adam steps at lr 1e-3 on MNIST): every state
    saturates at 0 or 1 and learning stops at 10 %; at lr/4 it reaches 85 %. The default base
    width 125 (lr 1e-3 is the rate of a matrix 125 wide) was chosen on full MNIST, 15 epochs,
    MSE, one-sided EP (benchmarks/results/lr_width_study.json, docs/ep.md): test accuracy with
    ``lr_width`` 500 / 250 / 125 — 784-500-10 98.20 / 98.23 / 98.44 %, 784-500-500-10 97.90 /
    98.26 / 98.44 %, 784-500-500-500-10 96.80 / 98.22 / 98.17 %; at 500 the deep nets' early
    epochs were unstable (84 % after three epochs with three hidden layers).

    ``conv``: a convolutional net (its kernels held as matrices, ``layers`` its state sizes).
    There a matrix between state layers counts the widest state at or below it, not only its two
    sides: after the second pooled conv layer (1024 units) of
    ``conv:32:5,pool:2,conv:64:5,pool:2`` a hidden ``fc:256`` or a third ``conv:128:3`` at
    lr·125/1024 stalls the net (Fashion-MNIST, 10k images, one epoch: 28.05 % and 9.70 %); at
    lr·125/4608 (this rule: the first conv layer's 4608 states) it learns (75.90 % and 74.35 %;
    the net without the extra layer 77.25 %; benchmarks/results/conv_fashion_probes_10k.json,
    docs/conv.md). On a net whose states only shrink upwards and end in the readout (two conv
    layers, then ``fc:classes``) nothing changes.
    """
    layers = tuple(int(n) for n in layers)
    out = []
    last = len(layers) - 2
    for l, (n_in, n_out) in enumerate(zip(layers[:-1], layers[1:])):
        if l == 0 or not lr_width:
            out.append(1.0)
            continue
        widest = max(layers[1:l + 2]) if conv else max(n_in, n_out)
        n = n_in if (cost == "ce" and l == last) else widest
        out.append(min(1.0, lr_width / n))
    return tuple(out)


def _noisy_reads(card) -> bool:
    """Whether a read of the card's arrays carries noise (read noise of the cells, output noise,
    ADC rounding): the settle's steady-state test then stops at a noise floor."""
    p = card.periphery
    return bool(getattr(card.device, "read_noise", 0.0) or p.out_noise or p.adc_bits)


def option_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(TrainConfig))


def _field(name: str):
    return next(f for f in fields(TrainConfig) if f.name == name)


def _int(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{name}={v!r} must be an integer ≥ {lo}")


def _float(name: str, v, positive: bool) -> None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 if positive else v >= 0)
    if not ok:
        raise ConfigError(f"{name}={v!r} must be a finite number {'> 0' if positive else '≥ 0'}")

"""The backprop baseline on the same weight store: the layers of the EP network as an MLP.

Forward, every array read through the store (``mvm``: DAC, read noise, ADC), hidden units the
network's activation ρ (the hard sigmoid), a linear output::

    a_l = W_l h_l + b_l,   h_{l+1} = ρ(a_l),   output a_{L−1}

Loss: ½‖a_{L−1} − y‖² (``--cost mse``) or softmax cross-entropy (``ce``). Backward through the
transpose reads of the same arrays (``mvm_t``, with the same periphery)::

    δ_{L−1} = ∂loss/∂a_{L−1},   δ_l = (W_{l+1}ᵀ δ_{l+1}) ⊙ ρ'(a_l)

and the update ΔW_l = −lr/B Σ_batch δ_l h_lᵀ, applied by the chosen regime: by the host optimizer
(``host``), or in the array by pulse coincidence (``analog``: aihwkit's analog SGD; or
``tiki-taka``). So EP and backprop meet on identical device physics (DESIGN §2).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
from torch import Tensor

from mep_hw.model import one_hot
from mep_hw.train.cost import learning_rule_neuron_ops
from mep_hw.train.observers import StepOut
from mep_hw.train.regimes import Estimate
from mep_hw.train.tracing import StepTotals

__all__ = ["BPTrainer"]


class _NoSettle(NamedTuple):
    """Stands in for a settle result where a trace or the step statistics expect one."""

    states: tuple


class _BPResult(NamedTuple):
    free: _NoSettle
    loss: Tensor
    logits: Tensor


class BPTrainer:
    """One backprop step per batch through the model's store (see the module docstring)."""

    def __init__(self, model, cfg, regime, x_test: Tensor, y_test: Tensor):
        self.model, self.cfg, self.regime = model, cfg, regime
        self.x_test, self.y_test = x_test, y_test
        self.totals = StepTotals()
        self.n_out = model.layers[-1]

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Inputs h_l of every layer and pre-activations a_l, read through the store."""
        st, act = self.model.store, self.model.act
        inb = act.box is not None
        h, pre = [x], []
        for l, op in enumerate(st.ops):
            b = None if st.holds_biases else self.model.biases[l].detach()
            a = op.mvm(h[-1], b, x_in_bound=inb and l > 0)
            pre.append(a)
            if l + 1 < len(st.ops):
                h.append(act.fn(a))
        return h, pre

    def _loss(self, out: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(per-sample loss, ∂loss/∂out)."""
        if self.model.cost == "ce":
            p = torch.softmax(out, dim=1)
            return -(torch.log_softmax(out, dim=1) * target).sum(1), p - target
        err = out - target
        return 0.5 * (err * err).sum(1), err

    def begin_epoch(self, epoch: int) -> None:
        self.totals.reset()
        self.counts0 = self.counts()

    @torch.no_grad()
    def step(self, x: Tensor, y: Tensor, generator) -> StepOut:
        target = one_hot(y, self.n_out, x.dtype)
        h, pre = self.forward(x)
        loss, delta = self._loss(pre[-1], target)
        st, act = self.model.store, self.model.act
        deltas = [delta]
        for l in range(len(pre) - 1, 0, -1):  # transpose reads of the same arrays
            deltas.insert(0, st.ops[l].mvm_t(deltas[0]) * act.deriv(pre[l - 1]))
        B = x.shape[0]
        grads = None
        if self.regime.needs_grads:
            grads = []
            for d, a in zip(deltas, h):
                grads += [d.T @ a / B, d.sum(0) / B]
        est = Estimate(grads, ((1.0, [(-d, a) for d, a in zip(deltas, h)]),), 1.0 / B, signed=True)
        self.regime.apply(est)
        sums = {"n": float(B), "loss": float(loss.sum()), "correct": float((pre[-1].argmax(1) == y).sum())}
        self.totals.add(sums)
        flops = 0
        if self.regime.needs_grads:  # the host's outer products
            flops = sum(2 * B * o * i + 2 * B * o for o, i in (tuple(w.shape) for w in self.model.weights))
        return StepOut(x, _BPResult(_NoSettle(()), loss, pre[-1]), {**dict.fromkeys(StepTotals.KEYS, 0.0), **sums},
                       self.regime.host_flops(B) + flops,
                       B * learning_rule_neuron_ops(self.cfg, self.model) + self.regime.neuron_ops(B))

    def counts(self):
        c = self.model.store.counts()
        return c + self.regime.counts() if hasattr(self.regime, "counts") else c

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        correct, loss = 0, 0.0
        for i in range(0, x.shape[0], self.cfg.eval_batch_size):
            xb, yb = x[i : i + self.cfg.eval_batch_size], y[i : i + self.cfg.eval_batch_size]
            out = self.forward(xb)[1][-1]
            correct += int((out.argmax(1) == yb).sum())
            loss += float(self._loss(out, one_hot(yb, self.n_out, x.dtype))[0].sum())
        n = max(1, x.shape[0])
        return correct / n, loss / n

    def end_epoch(self, epoch: int, seconds: float):
        from mep_hw.train.loop import EpochStats

        d = self.counts() - self.counts0
        t1 = time.perf_counter()
        test_acc, test_loss = self.evaluate(self.x_test, self.y_test)
        t = self.totals.sums
        n = max(1.0, t["n"])
        return EpochStats(
            epoch=epoch, train_loss=t["loss"] / n, train_accuracy=t["correct"] / n, test_loss=test_loss,
            test_accuracy=test_acc, epoch_seconds=seconds, eval_seconds=time.perf_counter() - t1,
            free_steps_mean=0.0, nudged_steps_mean=0.0, free_step_limit_frac=0.0, nudged_step_limit_frac=0.0,
            lr=self.regime.lr, pulses_up=d.pulses_up, pulses_down=d.pulses_down, refreshes=d.refreshes,
        )

"""Short EP training runs for the deep-network study, with the gradient alignment along the way.

    nice -n 10 python experiments/deep_train.py --layers 784,500,500,500,10 --data-dir /work/shared/data/mnist \
        --limit-train 10000 --epochs 1 --set estimator=one-sided beta=0.2 --probe-every 25 --out OUT.json

Trains like ``mep-hw train`` (same model, initialisation, batches, Adam, schedule and
``TrainConfig.ep_config()``; ``--set`` takes any TrainConfig field) with experiment-only knobs
that the run configuration does not have: ``--init-scale`` multiplies the initial weights,
``--layer-lr`` sets the learning-rate multiplier of each weight matrix and its bias (default:
the configuration's own per-layer rates, ``TrainConfig.param_groups``). Every
``--probe-every`` steps it measures, on a fixed probe batch, the cosine and relative error of the
run's own EP estimate (its ``ep_config``) against the exact implicit gradient (float64 fixed
point, :mod:`mep_hw.ep.reference`), per weight matrix. Writes one JSON file.
"""

from __future__ import annotations

import argparse
import dataclasses
import ast
import platform
import time
from pathlib import Path

import torch

from mep_hw.ep import assign_grads, ep_gradients
from mep_hw.ep.reference import exact_fixed_point, grad_alignment, implicit_gradient
from mep_hw.io import load_dataset
from mep_hw.io.runs import write_json
from mep_hw.model import LayeredHopfield, one_hot
from mep_hw.optimizers.strategies import SpectralConstraint
from mep_hw.settle import SettleConfig, SettleStatus
from mep_hw.train import TrainConfig

from mep_hw.model import build_network
from mep_hw.train.fit import epoch_generator, iterate_batches
from mep_hw.train.loop import evaluate

EXACT = SettleConfig(solver="euler", dt=0.5, atol=1e-11, rtol=0.0, max_steps=200_000)


def parse_set(items) -> dict:
    out = {}
    for it in items or []:
        k, _, v = it.partition("=")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def probe(model, xp, yp, ep_cfg) -> dict:
    m64 = LayeredHopfield(model.layers, activation=model.act.name, cost=model.cost, dtype=torch.float64)
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    fp = exact_fixed_point(m64, xp.double())
    ig = implicit_gradient(m64, xp.double(), yp.double(), fp.states)
    r = ep_gradients(model, xp, yp, ep_cfg)
    al = grad_alignment(r.grads, ig.grads)
    # the same estimator and β, settled exactly in float64: its bias alone, and the settle's error
    ex = ep_gradients(m64, xp.double(), yp.double(), dataclasses.replace(ep_cfg, free=EXACT, nudged=EXACT, strict=True))
    al_ex = grad_alignment(ex.grads, ig.grads)
    al_tol = grad_alignment(r.grads, ex.grads)
    lo = [float((t <= 1e-9).double().mean()) for t in fp.states]
    hi = [float((t >= 1 - 1e-9).double().mean()) for t in fp.states]
    return {"exact_est_cos": al_ex["cos"], "exact_est_cos_W": al_ex["cos_each"][0::2],
            "settle_cos": al_tol["cos"], "settle_cos_W": al_tol["cos_each"][0::2], "pinned_lo": lo, "pinned_hi": hi, "cos": al["cos"], "rel_err": al["rel_err"], "cos_W": al["cos_each"][0::2],
            "rel_err_W": al["rel_err_each"][0::2], "min_curvature": ig.min_curvature, "cg_iters": ig.cg_iters,
            "free_frac": ig.free_frac, "fixed_point_steps": int(fp.steps.max()),
            "grad_norm_W": [float(g.norm()) for g in ig.grads[0::2]],
            "est_norm_W": [float(g.norm()) for g in r.grads[0::2]]}


def _show(p: dict) -> None:
    print(f"probe {p['step']}: cos {p['cos']:.3f} W {[round(c, 3) for c in p['cos_W']]} | exact estimator "
          f"{p['exact_est_cos']:.3f} | settle {p['settle_cos']:.3f} | free {p['free_frac']:.2f} "
          f"hi {[round(v, 2) for v in p['pinned_hi']]} | min curv {p['min_curvature']:.3f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", required=True)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--limit-test", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], help="TrainConfig fields, key=value")
    p.add_argument("--init-scale", type=float, default=1.0)
    p.add_argument("--layer-lr", default=None, help="comma-separated lr multipliers, one per weight matrix")
    p.add_argument("--probe-every", type=int, default=0)
    p.add_argument("--probe-n", type=int, default=50)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--stop-after", type=int, default=0, help="stop after this many optimizer steps (0: run all epochs)")
    p.add_argument("--save-model", default=None, help="write the final state_dict here as {'model': …}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = TrainConfig(dataset=a.dataset, data_dir=a.data_dir, layers=a.layers, epochs=a.epochs,
                      limit_train=a.limit_train, limit_test=a.limit_test, **parse_set(a.set))
    ds = load_dataset(cfg.dataset, cfg.data_dir, limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    model = build_network(arch=None, layers=cfg.layers, input_shape=ds.input_shape, n_classes=ds.n_classes,
                          activation=cfg.activation, cost=cfg.cost, seed=cfg.seed)
    with torch.no_grad():
        for w in model.weights:
            w.mul_(a.init_scale)
    if a.layer_lr:  # explicit multipliers, weight matrix and its bias
        mult = [float(v) for v in a.layer_lr.split(",")]
        groups = [{"params": [w, b], "lr": cfg.lr * k} for w, b, k in zip(model.weights, model.biases, mult)]
    else:  # the run configuration's per-layer rates (lr_width)
        groups = cfg.param_groups(model)
    xtr = torch.as_tensor(ds.x_train, dtype=torch.float32)
    ytr = torch.as_tensor(ds.y_train)
    xte, yte = torch.as_tensor(ds.x_test, dtype=torch.float32), torch.as_tensor(ds.y_test)
    n = xtr.shape[0]
    steps_total = cfg.epochs * -(-n // cfg.batch_size)
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps_total) if cfg.schedule == "cosine" else None
    ep_cfg = cfg.ep_config()
    n_out = model.layers[-1]
    xp, yp = xtr[-a.probe_n:], one_hot(ytr[-a.probe_n:], n_out, torch.float32)  # probe: the last samples
    params = model.param_list()
    log, probes, epochs = [], [], []
    spectral_state: dict = {}
    step = 0
    win = {"correct": 0, "n": 0, "free": 0, "nud": 0, "nud_lim": 0, "n_nud": 0, "sec": 0.0}
    t_start = time.perf_counter()
    if a.probe_every:
        probes.append({"step": 0, **probe(model, xp, yp, ep_cfg)})
        _show(probes[-1])
    for epoch in range(1, cfg.epochs + 1):
        gen = epoch_generator(cfg.seed, epoch)
        t_ep = 0.0
        for idx in iterate_batches(n, cfg.batch_size, gen):
            x, y = xtr.index_select(0, idx), ytr.index_select(0, idx)
            t0 = time.perf_counter()
            r = ep_gradients(model, x, one_hot(y, n_out, x.dtype), ep_cfg, generator=gen)
            assign_grads(params, r.grads)
            opt.step()
            if cfg.spectral_gamma is not None and model.n_states > 1:  # as the training loop does
                SpectralConstraint(gamma=cfg.spectral_gamma).apply_coupled(
                    [w.data for w in model.weights[1: model.n_states]], spectral_state)
            if sched is not None:
                sched.step()
            dt = time.perf_counter() - t0
            t_ep += dt
            step += 1
            win["correct"] += int((model.logits(r.free.states).argmax(1) == y).sum())
            win["n"] += x.shape[0]
            win["free"] += int(r.free.steps.sum())
            for nd in r.nudged:
                win["nud"] += int(nd.steps.sum())
                win["nud_lim"] += int((nd.status == SettleStatus.STEP_LIMIT).sum())
                win["n_nud"] += x.shape[0]
            win["sec"] += dt
            if step % a.log_every == 0:
                row = {"step": step, "train_acc": win["correct"] / win["n"], "free_steps": win["free"] / win["n"],
                       "nudged_steps": win["nud"] / win["n_nud"], "nudged_limit_frac": win["nud_lim"] / win["n_nud"],
                       "sec_per_step": win["sec"] / a.log_every}
                log.append(row)
                print(" ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
                win = dict.fromkeys(win, 0)
                win["sec"] = 0.0
            if a.probe_every and step % a.probe_every == 0:
                probes.append({"step": step, **probe(model, xp, yp, ep_cfg)})
                _show(probes[-1])
            if a.stop_after and step >= a.stop_after:
                break
        acc, loss, fsteps, _ = evaluate(model, xte, yte, cfg)
        epochs.append({"epoch": epoch, "test_accuracy": acc, "test_loss": loss, "epoch_train_seconds": t_ep})
        print(f"epoch {epoch}: test acc {acc:.4f} ({t_ep:.0f}s)", flush=True)
        if a.stop_after and step >= a.stop_after:
            break
    if a.save_model:
        torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": step}, a.save_model)
    report = {"experiment": "deep_train", "machine": {"platform": platform.platform(), "torch": torch.__version__},
              "args": vars(a), "config": cfg.to_dict(), "epochs": epochs, "log": log, "probes": probes,
              "seconds": time.perf_counter() - t_start}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(a.out), report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

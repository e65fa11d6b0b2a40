"""Learning in the array: EP and backprop × update regimes × device cards, on MNIST.

    python -m mep_hw.benchmarks.in_array --data-dir DIR --epochs 10 \\
        --cards ideal pcm reram_taox reram_agsi ecram fefet \\
        --runs ep:host ep:analog ep:tiki-taka backprop:analog backprop:tiki-taka \\
        --out benchmarks/results/in_array.json

Every run is ``mep-hw train`` on 784-500-10 (the training defaults otherwise) with ``--method``
and ``--update`` from the run name and the learning rate of :data:`LR` (overridable with
``--lr ep:analog=0.1``). The JSON (rewritten after every run; runs already in it are skipped, so
an interrupted benchmark resumes) holds per run the test accuracy per epoch, the training
energy per sample and its split, the host FLOPs, neuron operations and pulses per sample, and wall
time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mep_hw.errors import ConfigError, DivergedError
from mep_hw.benchmarks._baseline import config_sets
from mep_hw.io import load_dataset
from mep_hw.io.runs import read_json, write_json
from mep_hw.train import TrainConfig, train
from mep_hw.train.config import HOST_LR, IN_ARRAY_LR, UPDATES

__all__ = ["LR", "run_one", "main"]

# learning rates per (method, update): the training defaults (the host regime's Adam; the in-array
# regimes' plain SGD rates, chosen on 10 000 images, 2 epochs, on the ideal card)
LR = {(m, u): HOST_LR if u == "host" else IN_ARRAY_LR[m] for m in IN_ARRAY_LR for u in UPDATES}


def _parse_run(name: str) -> tuple[str, str]:
    method, _, update = name.partition(":")
    if (method, update) not in LR:
        raise ConfigError(f"run {name!r}: expected METHOD:UPDATE with METHOD in ep, backprop and UPDATE in host, analog, tiki-taka")
    return method, update


def run_one(card: str, method: str, update: str, *, data_dir, epochs: int, lr: float, ds, extra: dict | None = None) -> dict:
    cfg = TrainConfig(dataset="mnist", data_dir=data_dir, layers=(784, 500, 10), epochs=epochs, device=card,
                      method=method, update=update, lr=lr, **(extra or {}))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        try:
            res, error = train(cfg, Path(tmp) / "run", dataset=ds, progress=False), None
        except DivergedError as exc:  # recorded with what the run left, the benchmark goes on
            res, error = None, exc
        wall = time.perf_counter() - t0
        m = read_json(Path(tmp) / "run" / "metrics.json")
    cost = (m.get("cost") or {}).get("train") or {}
    per = cost.get("per_sample", {})
    hist = m.get("history") or []
    return {
        "card": card, "method": method, "update": update, "lr": lr, "epochs": epochs, "config": dict(extra or {}),
        "status": error.status if error else "completed", "error": str(error) if error else None,
        "test_accuracy": res.test_accuracy if res else None,
        "test_accuracy_history": [h.get("test_accuracy") for h in hist],
        "train_loss_history": [h.get("train_loss") for h in hist],
        "energy_J_per_sample": cost.get("energy_J_per_sample"), "host_flops_per_sample": per.get("host_flops"),
        "neuron_ops_per_sample": per.get("neuron_ops"), "pulses_per_sample": per.get("pulses"), "wall_seconds": wall,
        "epoch_seconds": [h.get("epoch_seconds") for h in hist],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mep_hw.benchmarks.in_array", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--cards", nargs="+", default=["ideal", "pcm", "reram_taox", "reram_agsi", "ecram", "fefet"])
    p.add_argument("--runs", nargs="+", default=["ep:host", "ep:analog", "ep:tiki-taka", "backprop:analog", "backprop:tiki-taka"])
    p.add_argument("--lr", nargs="*", default=[], help="overrides, e.g. ep:analog=0.2")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                   help="a training-config field for every run, e.g. --set pulse_sampling=marginal (recorded in the JSON)")
    p.add_argument("--fast-lr-factor", type=float, default=None, metavar="F",
                   help="tiki-taka runs: drive the fast array at F × the run's learning rate (transfer_fast_lr; "
                   "default: the training default, 20: EP 0.1 → 2.0, backprop 0.05 → 1.0)")
    p.add_argument("--out", default="benchmarks/results/in_array.json")
    a = p.parse_args(argv)
    if a.fast_lr_factor is not None and not a.fast_lr_factor > 0:
        raise ConfigError(f"--fast-lr-factor {a.fast_lr_factor}: must be > 0")
    extra = config_sets(a.sets)
    lrs = dict(LR)
    for item in a.lr:
        key, _, value = item.partition("=")
        lrs[_parse_run(key)] = float(value)
    runs = [_parse_run(r) for r in a.runs]
    out = Path(a.out)
    report = read_json(out) if out.exists() else {"benchmark": "in_array", "network": "784-500-10", "runs": {}}
    report.update(epochs=a.epochs, limit_train=a.limit_train, limit_test=a.limit_test, config=extra)
    ds = load_dataset("mnist", a.data_dir, limit_train=a.limit_train, limit_test=a.limit_test)
    for card in a.cards:
        for method, update in runs:
            key = f"{card}/{method}:{update}"
            if key in report["runs"]:
                continue
            lr = lrs[(method, update)]
            run_extra = dict(extra)
            if update == "tiki-taka" and a.fast_lr_factor is not None:
                run_extra["transfer_fast_lr"] = a.fast_lr_factor * lr
            r = run_one(card, method, update, data_dir=a.data_dir, epochs=a.epochs, lr=lr, ds=ds, extra=run_extra)
            report["runs"][key] = r
            write_json(out, report)
            if r["status"] != "completed":
                print(f"{key}: {r['status']}: {r['error']}", flush=True)
                continue
            e = r["energy_J_per_sample"]
            print(f"{key}: test accuracy {r['test_accuracy']:.4f}, energy/sample "
                  f"{e['total'] if e else float('nan'):.3g} J, host FLOPs/sample {r['host_flops_per_sample']}, "
                  f"neuron ops/sample {r['neuron_ops_per_sample']}, {r['wall_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Recompute finished runs' cost with today's accounting of the neuron circuits' operations.

    python experiments/reaccount_neuron_ops.py RUN_DIR [RUN_DIR …] --out benchmarks/results/STUDY.json

Runs made before the neuron circuits were accounted for (``neuron_ops`` in
:mod:`mep_hw.hw.cost`) counted the learning rule's per-neuron arithmetic as host FLOPs — the
signed phases' subtractions ρ(s⁺) − ρ(s⁻) (one per first-layer unit and sample) and backprop's
loss gradient and ρ' masks (2 per output, 2 per hidden unit and sample) — and did not count the
neurons' state updates during the settles at all. This script takes each run's stored counts
(``metrics.json["cost"]``: per-sample counts × samples), moves exactly those operations from the
host FLOPs to the neuron operations, and recomputes the cost through the current code
(:meth:`mep_hw.train.cost.CostAccumulator.summary`, which adds the settles' neuron operations
from the stored settle steps). Per run it writes the energy as recorded by the run and as
recomputed, and the counts it moved. Nothing else is changed: accuracies, pulses, reads and
conversions are the run's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mep_hw.io.datasets import load_dataset
from mep_hw.io.runs import write_json
from mep_hw.train import TrainConfig
from mep_hw.train.cost import CostAccumulator, learning_rule_neuron_ops
from mep_hw.train.loop import build_model


def _counts(rec: dict, moved: float) -> dict:
    per, n = rec["per_sample"], rec["samples"]
    c = {k: v * n for k, v in per.items()}
    c["host_flops"] -= moved * n
    return {**c, "samples": n, "static_W": rec.get("static_W", 0.0), "neuron_ops": moved * n}


def _check(run_dir: Path, old: dict, new: dict, moved: float, const) -> None:
    """The recomputation changes nothing but the moved operations and the neurons' energy: the
    recomputed total minus the neurons' part, plus the moved operations at the host's energy per
    FLOP, is the recorded total (else the card's constants or the solver changed since the run)."""
    e_old, e_new = old["energy_J_per_sample"], new["energy_J_per_sample"]
    if e_old is None or e_new is None:
        return
    back = e_new["total"] - e_new["neurons"] + moved * const.host_e_flop_J
    if abs(back - e_old["total"]) > 1e-9 * abs(e_old["total"]):
        raise ValueError(f"{run_dir}: the recomputed energy does not reduce to the recorded one ({back:.6g} vs "
                         f"{e_old['total']:.6g} J): the card's cost constants or the run's solver have changed since "
                         "the run; recompute with the code of the run's time instead")


def recompute(run_dir: Path) -> tuple[dict, int, dict]:
    """(metrics.json, the learning-rule operations moved per sample, the cost summary under today's
    accounting) of a finished run; a run already made with the neuron operations counted is
    returned as recorded."""
    m = json.loads((run_dir / "metrics.json").read_text())
    old = m["cost"]
    if "neuron_ops" in old["train"]["per_sample"]:
        return m, 0, old
    cfg = TrainConfig.from_dict(m["config"])
    if cfg.method == "backprop" and cfg.update == "host":
        raise ValueError(f"{run_dir}: backprop on the host regime was also charged EP's two-phase estimate "
                         "FLOPs before the neurons were counted; this script does not migrate such runs")
    ds = load_dataset(cfg.dataset, cfg.data_dir, limit_train=1, limit_test=1)
    model = build_model(cfg, ds.input_shape, ds.n_classes)
    per_moved = learning_rule_neuron_ops(cfg, model)
    acc = CostAccumulator(phases=1 + (2 if cfg.estimator == "symmetric" else 1))
    acc.train = _counts(old["train"], per_moved)
    acc.test = _counts(old["inference"], 0)
    card = cfg.card()
    new = acc.summary(card, cfg, model)
    _check(run_dir, old["train"], new["train"], per_moved, card.cost)
    return m, per_moved, new


def reaccount(run_dir: Path) -> dict:
    m, per_moved, new = recompute(run_dir)
    old = m["cost"]
    e_old, e_new = old["train"]["energy_J_per_sample"] or {}, new["train"]["energy_J_per_sample"] or {}
    return {
        "label": run_dir.name, "test_accuracy": m["history"][-1]["test_accuracy"] if m["history"] else None,
        "moved_from_host_flops_per_sample": per_moved,
        "host_flops_per_sample": new["train"]["per_sample"]["host_flops"],
        "neuron_ops_per_sample": new["train"]["per_sample"]["neuron_ops"],
        "energy_J_per_sample_as_run": e_old.get("total"), "energy_J_per_sample": e_new.get("total"),
        "energy_split_J_per_sample": e_new or None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished run folders (each with metrics.json)")
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    rows = [reaccount(r) for r in a.runs]
    write_json(a.out, {"study": a.out.stem, "note": __doc__.split("\n\n")[2].replace("\n", " "), "runs": rows})
    for r in rows:
        old, new = r["energy_J_per_sample_as_run"], r["energy_J_per_sample"]
        print(f"{r['label']:24s} host FLOPs {r['host_flops_per_sample']:10.1f}  neuron ops {r['neuron_ops_per_sample']:9.1f}  "
              f"energy {old if old is None else f'{old:.4g}'} -> {new if new is None else f'{new:.4g}'} J")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

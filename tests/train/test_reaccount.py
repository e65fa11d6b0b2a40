"""experiments/reaccount_neuron_ops.py: a run recorded under the old accounting (the learning
rule's per-neuron arithmetic as host FLOPs, no neuron operations) recomputes to exactly what the
current code records for the same run."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from mep_hw.hw.cost import HOST_E_FLOP_J
from mep_hw.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(dataset="digits", layers=(64, 32, 10), epochs=1, batch_size=50, limit_train=200, limit_test=100)


def _script():
    spec = importlib.util.spec_from_file_location("reaccount", ROOT / "experiments" / "reaccount_neuron_ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _as_old(run: Path, moved: int) -> None:
    """Rewrite the run's cost record as the old accounting kept it."""
    path = run / "metrics.json"
    m = json.loads(path.read_text())
    for part in ("train", "inference"):
        rec = m["cost"][part]
        per = rec["per_sample"]
        per.pop("neuron_ops")
        if part == "train":
            per["host_flops"] += moved
            rec["energy_J_per_sample"]["host"] += moved * HOST_E_FLOP_J
            rec["energy_J_per_sample"].pop("neurons")
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("kind,moved", [("ep_signed", 32), ("backprop", 2 * 10 + 2 * 32), ("ep_separate", 0)])
def test_an_old_record_recomputes_to_what_the_current_code_records(tmp_path, kind, moved):
    kw = dict(method="backprop", lr=0.25) if kind == "backprop" else dict(
        lr=0.05, pulse_phases="signed" if kind == "ep_signed" else "separate")
    run = tmp_path / kind
    train(TrainConfig(**SMALL, device="ecram", update="analog", **kw), run, progress=False)
    recorded = json.loads((run / "metrics.json").read_text())["cost"]["train"]
    mod = _script()
    assert mod.reaccount(run)["energy_J_per_sample"] == recorded["energy_J_per_sample"]["total"]  # new: as recorded
    old = tmp_path / "old"
    old.mkdir()
    for f in run.iterdir():
        if f.is_file():
            (old / f.name).write_bytes(f.read_bytes())
    _as_old(old, moved)
    r = mod.reaccount(old)
    assert r["moved_from_host_flops_per_sample"] == moved
    assert r["host_flops_per_sample"] == pytest.approx(recorded["per_sample"]["host_flops"], abs=1e-9)
    assert r["neuron_ops_per_sample"] == pytest.approx(recorded["per_sample"]["neuron_ops"], rel=1e-12)
    for k, v in recorded["energy_J_per_sample"].items():
        assert r["energy_split_J_per_sample"][k] == pytest.approx(v, rel=1e-9, abs=1e-18), k

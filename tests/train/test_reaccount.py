"""experiments/reaccount_neuron_ops.py against real records of the old accounting: runs written
by commit e66a246 (the learning rule's per-neuron arithmetic as host FLOPs, the settles' neuron
updates not counted; ``data/legacy_cost``) recompute to exactly what the current code records for
the same runs — training and inference, every energy part, latency, host FLOPs, neuron
operations. And a checkpoint of the old accounting resumes into the new one."""

import importlib.util
import json
from pathlib import Path

import pytest

from mep_hw.train import TrainConfig, train
from mep_hw.train.cost import CostAccumulator
from tests.train.runs import metrics

ROOT = Path(__file__).resolve().parents[2]
LEGACY = Path(__file__).parent / "data" / "legacy_cost"
SMALL = dict(dataset="digits", layers=(64, 32, 10), epochs=1, batch_size=50, limit_train=200, limit_test=100)
# the configurations of the legacy records (device ecram)
CASES = {
    "ep_signed_analog": (dict(update="analog", lr=0.05, pulse_phases="signed"), 32),
    "ep_signed_tiki_taka": (dict(update="tiki-taka", lr=0.05, pulse_phases="signed"), 32),
    "backprop_analog": (dict(method="backprop", update="analog", lr=0.25), 2 * 10 + 2 * 32),
    "ep_host": (dict(update="host"), 0),
}


def _script():
    spec = importlib.util.spec_from_file_location("reaccount", ROOT / "experiments" / "reaccount_neuron_ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _legacy_run(tmp_path: Path, name: str) -> Path:
    run = tmp_path / f"legacy_{name}"
    run.mkdir()
    (run / "metrics.json").write_text((LEGACY / f"{name}.json").read_text())
    return run


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_old_record_recomputes_to_what_the_current_code_records(tmp_path, name):
    kw, moved = CASES[name]
    run = tmp_path / name
    train(TrainConfig(**SMALL, device="ecram", **kw), run, progress=False)
    now = metrics(run)["cost"]
    mod = _script()
    assert mod.reaccount(run)["energy_J_per_sample"] == now["train"]["energy_J_per_sample"]["total"]  # as recorded

    legacy = _legacy_run(tmp_path, name)
    old = metrics(legacy)["cost"]
    assert "neuron_ops" not in old["train"]["per_sample"]
    r = mod.reaccount(legacy)
    assert r["moved_from_host_flops_per_sample"] == moved
    assert r["energy_J_per_sample_as_run"] == old["train"]["energy_J_per_sample"]["total"]
    assert r["host_flops_per_sample"] == pytest.approx(now["train"]["per_sample"]["host_flops"], rel=1e-12, abs=1e-9)
    assert r["neuron_ops_per_sample"] == pytest.approx(now["train"]["per_sample"]["neuron_ops"], rel=1e-12)
    for k, v in now["train"]["energy_J_per_sample"].items():
        assert r["energy_split_J_per_sample"][k] == pytest.approx(v, rel=1e-9, abs=1e-21), k
    # the whole recomputed summary, inference and latencies included
    full = mod.recompute(legacy)[2]
    for part in ("train", "inference"):
        for key in ("latency_s_per_sample", "latency_s_per_phase"):
            assert full[part][key] == pytest.approx(now[part][key], rel=1e-12), (part, key)
        for k, v in now[part]["per_sample"].items():
            assert full[part]["per_sample"][k] == pytest.approx(v, rel=1e-9, abs=1e-9), (part, k)
        for k, v in now[part]["energy_J_per_sample"].items():
            assert full[part]["energy_J_per_sample"][k] == pytest.approx(v, rel=1e-9, abs=1e-21), (part, k)


def test_the_script_refuses_what_it_cannot_migrate(tmp_path):
    legacy = _legacy_run(tmp_path, "ep_host")
    m = metrics(legacy)
    m["cost"]["train"]["energy_J_per_sample"]["total"] *= 1.01  # as if the card's constants had changed
    (legacy / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="does not reduce to the recorded one"):
        _script().reaccount(legacy)
    m["config"].update(method="backprop", update="host")
    (legacy / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="does not migrate such runs"):
        _script().reaccount(legacy)


def test_a_checkpoint_of_the_old_accounting_resumes_into_the_new_one():
    """The learning rule's operations a legacy checkpoint holds in its host FLOPs are moved on load."""
    acc = CostAccumulator(phases=3)
    old = {"samples": 200, "host_flops": 200 * (273 - 32), "settle_steps": 1209.0}
    acc.load_state_dict({"train": {**old, "host_flops": 200 * 273}, "test": {"samples": 100}}, learning_rule_ops=32)
    assert acc.train["host_flops"] == old["host_flops"] and acc.train["neuron_ops"] == 200 * 32
    acc.load_state_dict({"train": {**old, "neuron_ops": 5}, "test": {"samples": 100}}, learning_rule_ops=32)
    assert acc.train["host_flops"] == old["host_flops"] and acc.train["neuron_ops"] == 5  # new format: as it is

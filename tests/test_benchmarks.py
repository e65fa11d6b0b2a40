"""The benchmark scripts run end to end on a tiny problem and write their JSON."""

import json

from mep_hw.benchmarks import foundation


def test_foundation_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "f.json"
    foundation.main(["--dataset", "digits", "--layers", "64,32,10", "--epochs", "2", "--limit-train", "200",
                     "--limit-test", "100", "--out", str(out)])
    r = json.loads(out.read_text())
    assert 0 <= r["ep"]["test_accuracy"] <= 1 and 0 <= r["backprop"]["test_accuracy"] <= 1
    assert len(r["ep"]["epoch_seconds"]) == 2 and len(r["backprop"]["epoch_seconds"]) == 2
    assert r["ep_over_backprop_epoch_time"] > 0
    assert r["ep"]["free_steps_mean_all"] >= 0 and r["ep"]["nudged_steps_mean_all"] >= 0

"""The conv and holomorphic benchmarks run end to end on tiny data and write their JSON."""

import json

import torch

from mep_hw.benchmarks import conv as conv_bench
from mep_hw.benchmarks import holomorphic as holo_bench
from mep_hw.model import ConvHopfield
from mep_hw.train import TrainConfig


def test_the_backprop_cnn_is_the_feedforward_pass_of_the_energy():
    m = ConvHopfield("conv:4:3,pool:2,fc:6,fc:10", (1, 8, 8), generator=torch.Generator().manual_seed(0))
    net = conv_bench.feedforward_cnn(m)
    x = torch.rand(5, 64)
    s = m.forward_init(m.dynamics(x))
    torch.testing.assert_close(net[:-1](x), s[-2])  # every hidden state: ρ(P(W⋆·) + b)
    torch.testing.assert_close(net(x).clamp(0, 1), s[-1])  # the output: linear here, ρ in the energy


def test_conv_benchmark_writes_both_histories(tmp_path):
    cfg = TrainConfig(dataset="digits", arch="conv:4:3,pool:2,fc:10", cost="ce", epochs=2, limit_train=100, limit_test=50)
    r = conv_bench.run(cfg, tmp_path / "c.json")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["ep"]["test_accuracy_history"] == r["ep"]["test_accuracy_history"] and len(saved["backprop"]["epoch_seconds"]) == 2
    assert saved["ep_over_backprop_epoch_time"] > 0 and saved["reads_per_sample"]["positions_per_weight"] == [36, 1]


def test_holomorphic_benchmark_orders_the_estimators(tmp_path):
    r = holo_bench.run((64, 12, 12, 10), "mse", 4, None, [0.1], [2, 4], [None, 5], tmp_path / "h.json")
    rows = {(row["N"], row["budget_steps"]): row for row in r["results"]}
    assert rows[(4, None)]["rel_error"] < 0.5 * rows[(2, None)]["rel_error"]  # O(β⁴) vs O(β²) (measured: 0.045 vs 0.21)
    assert rows[(4, None)]["real_equivalent_phases"] == 4 and rows[(2, None)]["real_equivalent_phases"] == 2
    assert json.loads((tmp_path / "h.json").read_text())["reference"]["cg_iterations"] > 0

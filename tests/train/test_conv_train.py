"""Training a convolutional Hopfield network: the --arch option, runs, resume, device tiles."""

import pytest
import torch

from mep_hw.errors import ConfigError
from mep_hw.host.flops import ep_estimate_flops, host_step_flops
from mep_hw.io.runs import load_checkpoint
from mep_hw.train import TrainConfig, train
from tests.train.runs import metrics, strip_times

ARCH = "conv:4:3,pool:2,fc:10"  # digits are 1×8×8: conv → 6×6 → pool → 4×3×3 = 36 → 10
SMALL = dict(dataset="digits", arch=ARCH, epochs=2, batch_size=50, limit_train=200, limit_test=100)


def test_arch_option_is_canonical_and_validated():
    assert TrainConfig(arch=" CONV:4:3 , maxpool:2,fc:10").arch == "conv:4:3,pool:2,fc:10"
    with pytest.raises(ConfigError, match="must follow a conv layer"):
        TrainConfig(arch="fc:10,pool:2")
    with pytest.raises(ConfigError, match="spectral_gamma .* does not yet cover convolutions"):
        TrainConfig(arch=ARCH, spectral_gamma=0.9)
    TrainConfig(arch="fc:32,fc:10", spectral_gamma=0.9)  # fc layers only: the coupling bound applies
    with pytest.raises(ConfigError, match="estimator='holomorphic' .* activation='hard_sigmoid' is not one"):
        TrainConfig(estimator="holomorphic")
    assert TrainConfig(estimator="holomorphic", activation="sigmoid").ep_config().points == 4


def test_defaults_of_a_conv_net():
    # measured (benchmarks/results/conv_lr_10k.json): Adam at 0.03 on a conv net, the block sweep
    cfg = TrainConfig(arch=ARCH, cost="ce")
    assert cfg.lr == 0.03 and cfg.settle_solver == "block" and cfg.estimator == "symmetric"
    assert TrainConfig(arch="fc:32,fc:10").lr == TrainConfig().lr == 1e-3  # dense: as before
    assert TrainConfig(arch=ARCH, lr=0.003).lr == 0.003  # a given rate wins
    assert TrainConfig(arch=ARCH, optimizer="sgd").lr == 1e-3  # measured for Adam only
    assert TrainConfig(arch=ARCH, solver="euler").settle_solver == "euler"


def test_a_conv_run_learns_and_resumes(tmp_path):
    # the conv path is characterised with symmetric EP (docs/conv.md); with the one-sided default of
    # ideal weights the 12 steps lower the loss the same (2.286 → 2.207) but leave 100 test digits at 15 %
    cfg = TrainConfig(**{**SMALL, "epochs": 3}, cost="ce", lr=0.01, estimator="symmetric")
    train(cfg, tmp_path / "a", progress=False)
    m = metrics(tmp_path / "a")
    assert m["status"] == "completed" and m["config"]["arch"] == ARCH
    assert m["config"]["layers"] == [64, 36, 10]
    losses = [h["train_loss"] for h in m["history"]]
    assert losses[0] > losses[1] > losses[2]  # 12 Adam steps: it learns (the MLP 64-36-10 is as slow here)
    assert m["history"][-1]["test_accuracy"] > 0.15  # 10 % is chance
    ck = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert tuple(ck["model"]["weights.0"].shape) == (4, 9)  # the kernel matrix a tile would hold
    # a second run from the stored config resumes (the stored layers agree with the arch)
    train(cfg.replace(epochs=4), tmp_path / "a", resume=True, explicit={"epochs"}, progress=False)
    assert metrics(tmp_path / "a")["epochs_completed"] == 4


def test_arch_must_end_with_the_classes():
    with pytest.raises(ConfigError, match="ends with fc:7 but dataset 'digits' has 10 classes"):
        train(TrainConfig(**{**SMALL, "arch": "conv:4:3,fc:7"}), "/nonexistent/never", progress=False)


def test_an_ideal_device_run_equals_the_ideal_conv_run(tmp_path):
    # the device reads each kernel tile once per output position (unfold → mvm → fold); with the
    # ideal card that is the same arithmetic as conv2d
    train(TrainConfig(**SMALL), tmp_path / "a", progress=False)
    train(TrainConfig(**SMALL, device="ideal"), tmp_path / "b", progress=False)
    ha, hb = strip_times(metrics(tmp_path / "a")["history"]), strip_times(metrics(tmp_path / "b")["history"])
    assert [h["test_accuracy"] for h in ha] == [h["test_accuracy"] for h in hb]
    ka, kb = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"], load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    for k in ka:
        torch.testing.assert_close(ka[k], kb[k], rtol=1e-4, atol=1e-5)


def test_a_pcm_conv_run_counts_reads_per_output_position(tmp_path):
    train(TrainConfig(**{**SMALL, "epochs": 1}, device="pcm", set={"levels": 16}, lr=0.01), tmp_path / "p", progress=False)
    m = metrics(tmp_path / "p")
    assert [p["shape"] for p in m["pulses"]] == [[4, 9], [10, 36]]
    assert 0.0 <= m["test_accuracy"] <= 1.0 and m["cost"] is not None
    # the cost model counts the kernel tile at each of its 6×6 output positions, as the tiles do:
    # inference = one read of every array (input drive, bottom-up init) + one field evaluation (the
    # 36→10 array forward and transposed) per settle step and one at the start
    cost, inf = m["cost"], m["cost"]["inference"]["per_sample"]
    reads = [36 * 4 * 9, 10 * 36]
    assert cost["macs_per_field_eval"] == 2 * reads[1]
    assert inf["macs"] == pytest.approx(sum(reads) + 2 * reads[1] * (inf["settle_steps"] + 1))
    tr = m["cost"]["train"]
    assert tr["per_sample"]["macs"] * 200 + inf["macs"] * 100 == pytest.approx(sum(p["macs"] for p in m["pulses"]))
    # the host's EP estimate sums each phase's outer products over the 36 positions of the kernel
    shapes, positions = [(4, 9), (10, 36)], (36, 1)
    assert tr["per_sample"]["host_flops"] == pytest.approx(
        (ep_estimate_flops(50, shapes, positions) + host_step_flops("adam", shapes, [4, 10])) * 4 / 200)
    assert ep_estimate_flops(50, shapes, positions) > ep_estimate_flops(50, shapes) + 2 * 2 * 50 * 35 * 36


def test_conv_nets_default_to_the_symmetric_estimator():
    """The one-sided estimator's tied free tolerance is out of reach of a conv net's Euler settle
    (measured: 97 % of MNIST free settles at the step limit, the run stopped by its guard), so a
    conv architecture resolves the default estimator to symmetric; an explicit choice wins."""
    from mep_hw.train import TrainConfig

    assert TrainConfig(arch="conv:4:3,pool:2,fc:10").estimator == "symmetric"
    assert TrainConfig(arch="conv:4:3,pool:2,fc:10", estimator="one-sided").estimator == "one-sided"
    assert TrainConfig(layers="784,100,10").estimator == "one-sided"

"""Data augmentation of training images (--augment): the transforms against their definition,
the option's validation, and runs that use it (resume, the conv benchmark's shared batches)."""

import pytest
import torch

from mep_hw.errors import ConfigError
from mep_hw.train import TrainConfig, train
from mep_hw.train.augment import Augment, augment_batch, augment_generator, parse_augment
from tests.train.runs import metrics, run_interrupted, strip_times


def _shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """img (C, H, W) translated by (dy, dx) pixels with zero fill, pixel by pixel."""
    c, h, w = img.shape
    out = torch.zeros_like(img)
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[:, i, j] = img[:, i - dy, j - dx]
    return out


def test_shift_translates_each_image_by_its_own_draw():
    x = torch.rand(40, 2 * 5 * 7, dtype=torch.float64)
    y = augment_batch(x, Augment(shift=2), (2, 5, 7), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the draws, in the documented order: B dy then B dx
    dy, dx = torch.randint(-2, 3, (40,), generator=g), torch.randint(-2, 3, (40,), generator=g)
    assert len({(int(a), int(b)) for a, b in zip(dy, dx)}) > 10  # the offsets differ between images
    for k in range(40):
        ref = _shifted(x[k].reshape(2, 5, 7), int(dy[k]), int(dx[k]))
        assert torch.equal(y[k].reshape(2, 5, 7), ref)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_flip_mirrors_about_half_of_the_images():
    n = 4000
    x = torch.rand(n, 1, 3, 4)
    y = augment_batch(x, Augment(flip=True), (1, 3, 4), torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.equal(y[k], x[k].flip(-1)) for k in range(n)])
    kept = torch.tensor([torch.equal(y[k], x[k]) for k in range(n)])
    assert bool((mirrored ^ kept).all())  # each image is itself or its mirror image
    # p = 1/2: the count is Binomial(4000, 1/2), sd 31.6; ±5 sd
    assert abs(int(mirrored.sum()) - n / 2) < 5 * (n / 4) ** 0.5


def test_no_augmentation_is_the_identity_and_draws_nothing():
    x = torch.rand(5, 64)
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    assert augment_batch(x, Augment(), (1, 8, 8), g) is x
    assert torch.equal(g.get_state(), state)


def test_the_option_is_parsed_and_validated():
    assert parse_augment("flip, SHIFT:2") == Augment(True, 2)
    assert TrainConfig(augment="shift:1,flip").augment == "flip,shift:1"  # canonical form, stored in config.toml
    assert TrainConfig().augment == "none" and not parse_augment("none").active
    for bad, why in (("shift:0", "whole number of pixels ≥ 1"), ("rotate", "'rotate' is not a transform"),
                     ("flip,flip", "given twice"), ("shift:two", "whole number")):
        with pytest.raises(ConfigError, match=why):
            TrainConfig(augment=bad)


def test_augmentation_needs_images(tmp_path):
    import numpy as np

    from mep_hw.io import Dataset

    flat = Dataset("digits", np.random.rand(20, 6).astype(np.float32), np.arange(20) % 3,
                   np.random.rand(10, 6).astype(np.float32), np.arange(10) % 3, 3, None)
    cfg = TrainConfig(layers=(6, 4, 3), epochs=1, batch_size=10, augment="flip")
    with pytest.raises(ConfigError, match="transforms images, but dataset 'digits' holds flat vectors"):
        train(cfg, tmp_path / "r", dataset=flat, progress=False)
    assert not (tmp_path / "r").exists()  # refused before the run folder was made


SMALL = dict(dataset="digits", layers=(64, 32, 10), epochs=2, batch_size=50, limit_train=200, limit_test=100)


def test_an_augmented_run_differs_from_the_plain_one_and_resumes_exactly(tmp_path):
    cfg = TrainConfig(**SMALL, augment="flip,shift:1")
    train(cfg, tmp_path / "a", progress=False)
    train(cfg.replace(augment="none"), tmp_path / "plain", progress=False)
    a, plain = metrics(tmp_path / "a"), metrics(tmp_path / "plain")
    assert a["config"]["augment"] == "flip,shift:1"
    assert a["history"][0]["train_loss"] != plain["history"][0]["train_loss"]  # it trained on other images
    # interrupted mid-epoch 2 and resumed: the same images, the same history
    run_interrupted(cfg, tmp_path / "b", epoch=2, batch=1)
    train(cfg, tmp_path / "b", resume=True, progress=False)
    assert strip_times(metrics(tmp_path / "b")["history"]) == strip_times(a["history"])


def test_the_augmentation_stream_is_its_own():
    # separate from the epoch generator that shuffles (mep_hw.train.fit.epoch_generator): turning
    # augmentation on does not change the batches' order or the estimator's draws
    from mep_hw.train.fit import epoch_generator

    first = lambda g: tuple(torch.rand(4, generator=g).tolist())
    runs = [(s, e) for s in range(4) for e in range(1, 31)]
    streams = {first(epoch_generator(s, e)) for s, e in runs}
    assert not streams & {first(augment_generator(s, e)) for s, e in runs}
    assert torch.equal(torch.rand(8, generator=augment_generator(4, 2)), torch.rand(8, generator=augment_generator(4, 2)))

"""Label-preserving data augmentation of image batches: horizontal flips and small translations.

``--augment`` takes ``none`` or a comma list of ``flip`` (mirror each image left–right with
probability ½) and ``shift:N`` (translate each image by (dy, dx), each drawn uniformly from
{−N, …, N}, filling with zeros — the padded random crop of the CIFAR recipe, He et al. 2016).
Each training batch is transformed on the host before it is driven into the network; evaluation
never is. The draws come from :func:`augment_generator` (one stream per run seed and epoch,
separate from the epoch's shuffling and the estimator's draws), so a resumed run and a baseline
trained on the same batches see the same images, and a run without augmentation keeps every
random draw it had before augmentation existed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mep_hw.errors import ConfigError

__all__ = ["Augment", "parse_augment", "augment_batch", "augment_generator"]

_HELP = "none, or a comma list of flip and shift:N (N ≥ 1 pixels), e.g. flip,shift:2"


class Augment(NamedTuple):
    flip: bool = False
    shift: int = 0

    @property
    def active(self) -> bool:
        return self.flip or self.shift > 0

    def __str__(self) -> str:
        toks = (["flip"] if self.flip else []) + ([f"shift:{self.shift}"] if self.shift else [])
        return ",".join(toks) or "none"


def parse_augment(spec: str | None) -> Augment:
    """``none`` / ``flip`` / ``shift:2`` / ``flip,shift:2`` → :class:`Augment` (ConfigError otherwise)."""
    if spec is None:
        return Augment()
    if not isinstance(spec, str):
        raise ConfigError(f"augment={spec!r} must be a string: {_HELP}")
    flip, shift = False, 0
    toks = [t for t in spec.replace(" ", "").lower().split(",") if t]
    if toks == ["none"] or not toks:
        return Augment()
    for tok in toks:
        if tok == "flip" and not flip:
            flip = True
        elif tok.startswith("shift:") and not shift:
            try:
                shift = int(tok[len("shift:"):])
            except ValueError:
                shift = 0
            if shift < 1:
                raise ConfigError(f"augment={spec!r}: {tok!r} needs a whole number of pixels ≥ 1; {_HELP}")
        else:
            raise ConfigError(f"augment={spec!r}: {tok!r} is not a transform (or is given twice); {_HELP}")
    return Augment(flip, shift)


def augment_generator(seed: int, epoch: int) -> torch.Generator:
    """The augmentation draws of epoch ``epoch`` of a run seeded with ``seed`` (CPU)."""
    # the CPU generator keeps the low 32 bits of its seed; the offset (≈ 2.65·10⁹) keeps these streams
    # apart from the same run's epoch_generator streams (seed · 1 000 003 + epoch) for any epoch count
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch + 0x9E3779B9) % 2**32)


def augment_batch(x: Tensor, aug: Augment, image_shape: tuple[int, int, int], generator: torch.Generator) -> Tensor:
    """The batch ``x`` ((B, C·H·W) flat or (B, C, H, W)) with each image flipped / translated by
    its own draw; returns the input's shape, dtype and device. Draws B flip bits, then B dy and B
    dx, from ``generator`` on the CPU."""
    if not aug.active:
        return x
    c, h, w = image_shape
    b = x.shape[0]
    img = x.reshape(b, c, h, w)
    if aug.flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        img = torch.where(mask[:, None, None, None], img.flip(-1), img)
    if aug.shift:
        n = aug.shift
        dy = torch.randint(-n, n + 1, (b,), generator=generator).to(x.device)
        dx = torch.randint(-n, n + 1, (b,), generator=generator).to(x.device)
        padded = torch.nn.functional.pad(img, (n, n, n, n))
        # output pixel (i, j) of image k reads padded pixel (i + n − dy_k, j + n − dx_k): a shift by (dy, dx)
        rows = (torch.arange(h, device=x.device)[None, :] + n - dy[:, None])  # (B, H)
        cols = (torch.arange(w, device=x.device)[None, :] + n - dx[:, None])  # (B, W)
        k = torch.arange(b, device=x.device)[:, None, None]
        img = padded.permute(0, 2, 3, 1)[k, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return img.reshape(x.shape).contiguous()

"""Training patches: random crops of the samples, augmented, reproducible from (seed, epoch, index) whatever the
number of DataLoader workers or processes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InputError
from .augment import Augment
from .samples import Sample


def random_crop(image: np.ndarray, target: np.ndarray, weight: np.ndarray | None, size: int, rng: np.random.Generator):
    """A size x size window at a random position; a side shorter than `size` is first mirror-padded (reflect)."""
    _, h, w = image.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        image = np.pad(image, ((0, 0),) + pads, mode="reflect" if min(h, w) > 1 else "edge")
        target = np.pad(target, pads, mode="reflect" if min(h, w) > 1 else "edge")
        weight = None if weight is None else np.pad(weight, pads, mode="reflect" if min(h, w) > 1 else "edge")
        _, h, w = image.shape
    y = int(rng.integers(h - size + 1))
    x = int(rng.integers(w - size + 1))
    sl = (slice(y, y + size), slice(x, x + size))
    return image[:, sl[0], sl[1]], target[sl], None if weight is None else weight[sl]


class PatchDataset(torch.utils.data.Dataset):
    """Random training patches: item i is a crop of sample i % len(samples), augmented.

    Randomness comes from numpy Generators seeded by (seed, epoch, i), so an epoch's patches are the same whatever
    the number of DataLoader workers or processes, and a resumed run sees the patches the killed one would have.
    Call `set_epoch(e)` before each epoch. Items: (image (C, s, s) float32, target (s, s) int64, weight (s, s) float32).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        crop: int | None = 256,
        augment: Augment | None = None,
        patches_per_image: int = 1,
        seed: int = 0,
    ):
        if not samples:
            raise InputError("no training samples")
        if crop is not None and crop < 1:
            raise InputError(f"crop must be a positive number of pixels, got {crop}")
        if crop is None and len({s.target.shape for s in samples}) > 1:
            raise InputError("images of different sizes need a crop size (--crop) to be batched")
        self.samples = list(samples)
        self.crop = crop
        self.augment = augment
        self.patches_per_image = max(1, int(patches_per_image))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples) * self.patches_per_image

    def __getitem__(self, i: int):
        s = self.samples[i % len(self.samples)]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        image, target, weight = s.image, s.target, s.weight
        if self.crop is not None:
            image, target, weight = random_crop(image, target, weight, self.crop, rng)
        if self.augment is not None:
            image, target, weight = self.augment(image, target, weight, rng)
        if weight is None:
            weight = np.ones(target.shape, dtype=np.float32)
        return (
            torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(target).astype(np.int64)),
            torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)),
        )


def default_patches_per_image(samples: Sequence[Sample], crop: int | None) -> int:
    """Enough random crops per image per epoch to cover its area about once."""
    if crop is None:
        return 1
    area = np.mean([s.target.size for s in samples])
    return max(1, int(round(area / crop**2)))

"""Samples: one image (or stack slice) as float32 (C, H, W) pixels with its class map and optional loss weights;
class frequencies and the U-Net paper's weight map."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .classes import ClassTable
from .io import LOSSY_SUFFIXES, to_float
from .pairing import Pair


@dataclass
class Sample:
    """One training/validation image: (C, H, W) float32 pixels, (H, W) class indices, optional (H, W) loss weights."""

    name: str
    image: np.ndarray
    target: np.ndarray
    weight: np.ndarray | None = None


def image_channels(pairs: Sequence[Pair]) -> int:
    return max(p.image.shape[-1] for p in pairs)


def image_to_chw(arr: np.ndarray, channels: int, normalize: str, name: str) -> np.ndarray:
    """One (H, W, C) slice -> (channels, H, W) float32; grey is repeated to fill RGB, colour into grey is refused."""
    c = arr.shape[-1]
    if c != channels:
        if c == 1:
            arr = np.repeat(arr, channels, axis=-1)
        else:
            raise InputError(
                f"{name} has {c} channels but the model takes {channels}; convert the image "
                f"(e.g. to {'greyscale' if channels == 1 else 'RGB'})"
            )
    return np.ascontiguousarray(np.moveaxis(to_float(arr, normalize), -1, 0))


def load_samples(
    pairs: Sequence[Pair],
    table: ClassTable,
    channels: int | None = None,
    normalize: str = "dtype",
    weight_map: dict | None = None,
) -> list[Sample]:
    """Samples (one per image, or per slice of a stack) with masks encoded by `table`; every bad mask is listed.

    weight_map: None, or keyword arguments of `unet_weight_map` plus "class_weights" (the paper's loss weights).
    """
    channels = channels or image_channels(pairs)
    samples, problems = [], []
    for p in pairs:
        lossy = p.mask_path is not None and p.mask_path.suffix.lower() in LOSSY_SUFFIXES
        for k in range(p.image.shape[0]):
            name = p.name if p.image.shape[0] == 1 else f"{p.name}[{k}]"
            m = p.mask[k if p.mask.shape[0] > 1 else 0]
            try:
                target = table.encode(m, p.mask_path.name if p.mask_path else name, lossy=lossy)
                image = image_to_chw(p.image[k], channels, normalize, p.image_path.name)
            except InputError as e:
                problems.append(str(e))
                break
            weight = None
            if weight_map is not None:
                weight = unet_weight_map(target, **weight_map)
            samples.append(Sample(name, image, target, weight))
    if problems:
        raise InputError("bad training data:\n  - " + "\n  - ".join(problems))
    return samples


def class_frequencies(samples: Sequence[Sample], num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes, dtype=np.float64)
    for s in samples:
        counts += np.bincount(s.target.ravel().astype(np.int64), minlength=num_classes)[:num_classes]
    return counts / max(counts.sum(), 1.0)


def balancing_weights(frequencies: np.ndarray) -> list[float]:
    """w_c = 1 / (K * freq_c), clipped to [0.1, 10]: each class contributes equally to a weighted loss."""
    k = len(frequencies)
    w = 1.0 / (k * np.maximum(frequencies, 1e-6))
    return np.clip(w, 0.1, 10.0).tolist()


def unet_weight_map(
    target: np.ndarray, class_weights: Sequence[float] | None = None, w0: float = 10.0, sigma: float = 5.0
) -> np.ndarray:
    """The U-Net paper's loss weights (Ronneberger et al. 2015, eq. 2):
    w(x) = w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)).

    d1, d2: distances to the nearest and second-nearest object, where objects are the connected components of
    the non-background classes (class > 0); the border term applies to background pixels, so the thin gaps between
    touching objects get large weights. w_c: per-class weights (default 1).
    """
    from scipy import ndimage

    target = np.asarray(target)
    k = int(target.max()) + 1
    cw = np.ones(max(k, 2)) if class_weights is None else np.asarray(class_weights, dtype=np.float64)
    w = cw[np.minimum(target, len(cw) - 1)].astype(np.float32)
    labels, n = ndimage.label(target > 0)
    if n < 2:
        return w
    h, wd = target.shape
    reach = int(math.ceil(4 * sigma))  # beyond d1 > 4 sigma the term is below exp(-8): not worth computing
    d1 = np.full(target.shape, np.inf, dtype=np.float32)
    d2 = np.full(target.shape, np.inf, dtype=np.float32)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        y0, y1 = max(sl[0].start - reach, 0), min(sl[0].stop + reach, h)
        x0, x1 = max(sl[1].start - reach, 0), min(sl[1].stop + reach, wd)
        d = ndimage.distance_transform_edt(labels[y0:y1, x0:x1] != i).astype(np.float32)
        a, b = d1[y0:y1, x0:x1], d2[y0:y1, x0:x1]
        nearer = d < a
        b[...] = np.where(nearer, a, np.minimum(b, d))
        a[...] = np.where(nearer, d, a)
    border = w0 * np.exp(-np.square(d1 + d2) / (2 * sigma**2))
    return w + np.where(target == 0, border, 0.0).astype(np.float32)

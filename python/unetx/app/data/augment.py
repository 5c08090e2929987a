"""Random augmentation of training patches: flips, 90-degree rotations, the U-Net paper's elastic deformation,
brightness and contrast. scipy loads here, when a deformation is first drawn."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Augment:
    """Random augmentation of a training patch, identical for image, mask and weight map (intensity: image only).

    flips and 90-degree rotations; the U-Net paper's elastic deformation (with probability `elastic`): random
    displacements on a coarse `elastic_grid` x `elastic_grid` grid, normal with `elastic_sigma` pixels standard
    deviation, bicubically upsampled to per-pixel displacements; brightness offset in +-`brightness` and contrast
    factor in 1 +- `contrast`.
    """

    flips: bool = True
    rot90: bool = True
    elastic: float = 0.5
    elastic_sigma: float = 10.0
    elastic_grid: int = 3
    brightness: float = 0.1
    contrast: float = 0.1

    def __call__(self, image: np.ndarray, target: np.ndarray, weight: np.ndarray | None, rng: np.random.Generator):
        if self.flips:
            if rng.random() < 0.5:
                image, target = image[:, :, ::-1], target[:, ::-1]
                weight = None if weight is None else weight[:, ::-1]
            if rng.random() < 0.5:
                image, target = image[:, ::-1], target[::-1]
                weight = None if weight is None else weight[::-1]
        if self.rot90 and image.shape[1] == image.shape[2]:
            k = int(rng.integers(4))
            image, target = np.rot90(image, k, axes=(1, 2)), np.rot90(target, k)
            weight = None if weight is None else np.rot90(weight, k)
        if self.elastic > 0 and rng.random() < self.elastic:
            image, target, weight = elastic_deform(image, target, weight, rng, self.elastic_sigma, self.elastic_grid)
        if self.brightness > 0 or self.contrast > 0:
            c = 1.0 + rng.uniform(-self.contrast, self.contrast)
            b = rng.uniform(-self.brightness, self.brightness)
            mean = image.mean(axis=(1, 2), keepdims=True)
            image = (image - mean) * c + mean + b
        return (
            np.ascontiguousarray(image, dtype=np.float32),
            np.ascontiguousarray(target),
            None if weight is None else np.ascontiguousarray(weight, dtype=np.float32),
        )


def elastic_deform(
    image: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None,
    rng: np.random.Generator,
    sigma: float = 10.0,
    grid: int = 3,
):
    """The U-Net paper's elastic deformation of a (C, H, W) image with its (H, W) mask (nearest) and weights."""
    from scipy import ndimage

    h, w = target.shape
    coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
    # bicubic (order 3) upsampling of the coarse displacement grid to one displacement per pixel
    dy = ndimage.zoom(coarse[0], (h / grid, w / grid), order=3, mode="nearest", grid_mode=True)[:h, :w]
    dx = ndimage.zoom(coarse[1], (h / grid, w / grid), order=3, mode="nearest", grid_mode=True)[:h, :w]
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    coords = np.stack([yy + dy, xx + dx])
    image = np.stack([ndimage.map_coordinates(c, coords, order=1, mode="reflect") for c in image])
    target = ndimage.map_coordinates(target, coords, order=0, mode="reflect")
    if weight is not None:
        weight = ndimage.map_coordinates(weight, coords, order=1, mode="reflect")
    return image, target, weight

"""Synthetic cell-like images with exact masks, for the demo and the tests.

Touching blobs of varied size and shape (wobbly ellipses), each with its own brightness, inner texture and a darker
rim; touching cells are separated in the mask by a one-pixel background line (as in the U-Net paper's cell data);
uneven illumination, blur and noise on top.

    image, mask = unetx.synthetic.cells(256, 256, rng=np.random.default_rng(0))   # uint8, mask 0/255
    unetx.synthetic.write_dataset("data/", n_train=24, n_val=6, size=128)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage


def cells(
    height: int, width: int, rng: np.random.Generator, radius: tuple[float, float] = (6.0, 16.0), fill: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image: (H, W) uint8 image and (H, W) uint8 mask (255 = cell, 0 = background)."""
    labels = _blobs(height, width, rng, radius, fill)
    # a pixel next to another cell's pixel is background: touching cells stay separate objects
    inner_border = (labels > 0) & _touches_other_cell(labels)
    mask = ((labels > 0) & ~inner_border).astype(np.uint8) * 255

    # appearance
    n = int(labels.max())
    brightness = np.concatenate([[0.0], rng.uniform(0.35, 0.95, n)])
    img = brightness[labels]
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (height, width)), 1.5)
    img = img + 0.08 * texture * (labels > 0)
    # a darker rim inside every cell, strongest at its edge
    dist = ndimage.distance_transform_edt(labels > 0) if n else np.zeros((height, width))
    edge_to_other = (
        ndimage.distance_transform_edt(~inner_border) if inner_border.any() else np.full((height, width), 99.0)
    )
    rim = np.exp(-np.minimum(dist, edge_to_other) / 1.5) * (labels > 0)
    img = img - 0.3 * rim * img
    # a nucleus-like darker spot in some cells
    img = img * (1 - 0.25 * _nuclei(labels, rng))
    background = 0.15 + 0.05 * ndimage.gaussian_filter(rng.normal(0, 1, (height, width)), 6)
    img = np.where(labels > 0, img, background)
    # uneven illumination: a smooth gradient times a broad bump
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    gy, gx = rng.uniform(-0.35, 0.35, 2)
    cy, cx = rng.uniform(0, 1, 2)
    illum = (1 + gy * (yy - 0.5) + gx * (xx - 0.5)) * (0.85 + 0.3 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.3))
    img = ndimage.gaussian_filter(img * illum, 0.8)
    img = img + rng.normal(0, 0.04, img.shape)
    img = rng.poisson(np.clip(img, 0, None) * 200) / 200.0
    image = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return image, mask


def _touches_other_cell(labels: np.ndarray) -> np.ndarray:
    """Cell pixels with a 4-neighbour in a different cell: the line that separates touching cells."""
    out = np.zeros(labels.shape, dtype=bool)
    for axis in (0, 1):
        a = np.moveaxis(labels, axis, 0)
        diff = (a[1:] != a[:-1]) & (a[1:] > 0) & (a[:-1] > 0)
        o = np.moveaxis(out, axis, 0)
        # mark the pixel with the larger label only, so the separating line is one pixel wide
        bigger_second = a[1:] > a[:-1]
        o[1:] |= diff & bigger_second
        o[:-1] |= diff & ~bigger_second
    return out


def _blobs(height: int, width: int, rng: np.random.Generator, radius: tuple[float, float], fill: float) -> np.ndarray:
    """Label image of wobbly ellipses packed so that many touch; overlaps go to the nearer (relative) centre."""
    rmin, rmax = radius
    target_area = fill * height * width
    area = 0.0
    centres: list[tuple[float, float, float]] = []
    tries = 0
    while area < target_area and tries < 4000:
        tries += 1
        r = rng.uniform(rmin, rmax)
        cy, cx = rng.uniform(-r / 2, height + r / 2), rng.uniform(-r / 2, width + r / 2)
        if all((cy - y) ** 2 + (cx - x) ** 2 > (0.75 * (r + q)) ** 2 for y, x, q in centres):
            centres.append((cy, cx, r))
            area += np.pi * r * r * 0.8
    best = np.full((height, width), np.inf)
    labels = np.zeros((height, width), dtype=np.int32)
    for i, (cy, cx, r) in enumerate(centres, start=1):
        ecc = rng.uniform(0.7, 1.0)
        theta0 = rng.uniform(0, np.pi)
        harmonics = [(k, rng.uniform(0, 0.08), rng.uniform(0, 2 * np.pi)) for k in (3, 4, 5)]
        reach = int(np.ceil(r * 1.4)) + 2
        y0, y1 = max(int(cy) - reach, 0), min(int(cy) + reach + 1, height)
        x0, x1 = max(int(cx) - reach, 0), min(int(cx) + reach + 1, width)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        dy, dx = yy - cy, xx - cx
        c, s = np.cos(theta0), np.sin(theta0)
        u, v = c * dx + s * dy, (-s * dx + c * dy) / ecc
        ang = np.arctan2(v, u)
        wobble = 1 + sum(a * np.cos(k * ang + p) for k, a, p in harmonics)
        rho = np.hypot(u, v) / (r * wobble)
        inside = (rho < 1) & (rho < best[y0:y1, x0:x1])
        best[y0:y1, x0:x1][inside] = rho[inside]
        labels[y0:y1, x0:x1][inside] = i
    return labels


def _nuclei(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(labels.shape)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or rng.random() < 0.4:
            continue
        ys, xs = np.nonzero(labels[sl] == i)
        if len(ys) < 20:
            continue
        cy, cx = ys.mean() + sl[0].start, xs.mean() + sl[1].start
        r = np.sqrt(len(ys) / np.pi) * rng.uniform(0.25, 0.45)
        yy, xx = np.mgrid[sl[0], sl[1]]
        out[sl] = np.maximum(out[sl], np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) * (labels[sl] == i))
    return out


def write_dataset(
    root: str | Path, n_train: int = 24, n_val: int = 6, size: int = 128, large: int = 512, seed: int = 0
) -> dict[str, Path]:
    """Write train/, val/ and large/ folders (images/ and masks/ as PNG) and return their paths."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    out = {}
    for split, count, side in (("train", n_train, size), ("val", n_val, size), ("large", 1 if large else 0, large)):
        if count == 0:
            continue
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = cells(side, side, rng)
            Image.fromarray(image).save(root / split / "images" / f"{i:03d}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{i:03d}.png")
        out[f"{split}_images"] = root / split / "images"
        out[f"{split}_masks"] = root / split / "masks"
    return out

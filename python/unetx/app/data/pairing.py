"""Pairing image files with their mask files by stem, every problem reported at once; unlabelled inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .io import list_images, read_image


@dataclass
class Pair:
    """An image file, its mask file (None for unlabelled images) and their pixels, (slices, H, W, C)."""

    name: str
    image_path: Path
    mask_path: Path | None
    image: np.ndarray
    mask: np.ndarray | None = None


def pair_files(images: str | Path, masks: str | Path, mask_suffix: str = "") -> list[Pair]:
    """Read the images and masks of two folders and pair them by file stem (mask stem = image stem + mask_suffix).

    Every problem (images without masks, masks without images, two files with one stem, unreadable files, size or
    slice-count mismatches) is collected and raised as one InputError listing them all by name.
    """
    image_files = list_images(images, "images")
    mask_files = list_images(masks, "masks")
    problems: list[str] = []
    by_stem: dict[str, Path] = {}
    for p in image_files:
        if p.stem in by_stem:
            problems.append(f"two images with the stem '{p.stem}': {by_stem[p.stem].name}, {p.name}")
        by_stem[p.stem] = p
    mask_by_stem: dict[str, Path] = {}
    for p in mask_files:
        stem = p.stem
        if mask_suffix:
            if not stem.endswith(mask_suffix):
                problems.append(f"mask {p.name} does not end with the mask suffix '{mask_suffix}'")
                continue
            stem = stem[: -len(mask_suffix)]
        if stem in mask_by_stem:
            problems.append(f"two masks for '{stem}': {mask_by_stem[stem].name}, {p.name}")
        mask_by_stem[stem] = p
    for stem, p in by_stem.items():
        if stem not in mask_by_stem:
            problems.append(f"image {p.name} has no mask (expected {stem}{mask_suffix}.* in {masks})")
    for stem, p in mask_by_stem.items():
        if stem not in by_stem:
            problems.append(f"mask {p.name} has no image (expected {stem}.* in {images})")
    pairs = []
    for stem in sorted(set(by_stem) & set(mask_by_stem)):
        ip, mp = by_stem[stem], mask_by_stem[stem]
        img = msk = None
        for path, is_mask in ((ip, False), (mp, True)):
            try:
                arr = read_image(path, mask=is_mask)
            except InputError as e:
                problems.append(str(e))
                continue
            if is_mask:
                msk = arr
            else:
                img = arr
        if img is None or msk is None:
            continue
        if img.shape[1:3] != msk.shape[1:3]:
            problems.append(
                f"{ip.name} is {img.shape[2]}x{img.shape[1]} but its mask {mp.name} is "
                f"{msk.shape[2]}x{msk.shape[1]} (width x height)"
            )
            continue
        if img.shape[0] != msk.shape[0] and msk.shape[0] != 1:
            problems.append(f"{ip.name} has {img.shape[0]} slices but its mask {mp.name} has {msk.shape[0]}")
            continue
        pairs.append(Pair(stem, ip, mp, img, msk))
    if problems:
        raise InputError(
            f"cannot pair the images in {images} with the masks in {masks} "
            f"({len(problems)} problem{'s' * (len(problems) > 1)}):\n  - " + "\n  - ".join(problems)
        )
    return pairs


def read_images(inputs: str | Path | Sequence[str | Path]) -> list[Pair]:
    """Unlabelled images from a file, a folder, or a list of files (for prediction). Problems are listed together."""
    if isinstance(inputs, (str, Path)):
        p = Path(inputs)
        if not p.exists():
            raise InputError(f"input {p} does not exist")
        files = list_images(p, "input") if p.is_dir() else [p]
    else:
        files = [Path(f) for f in inputs]
    pairs, problems = [], []
    for f in files:
        try:
            pairs.append(Pair(f.stem, f, None, read_image(f)))
        except InputError as e:
            problems.append(str(e))
    if problems:
        raise InputError(
            f"cannot read {len(problems)} input file{'s' * (len(problems) > 1)}:\n  - " + "\n  - ".join(problems)
        )
    return pairs

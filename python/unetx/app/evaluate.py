"""Evaluation: a trained model's per-image Dice and IoU against reference masks, by the same overlap-tile path
`unetx predict` uses. `unetx evaluate` and `unetx demo` both call `evaluate`.

    result = unetx.app.evaluate(model, "test/images", "test/masks", classes=table, normalize="dtype")
    result.rows            # one dict per image (stack slice): name, dice_<class>, iou_<class>
    result.summary()       # (mean over images, pooled over all pixels), rows of the same keys
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import ClassTable, image_to_chw, pair_files
from .data.io import LOSSY_SUFFIXES
from .errors import InputError
from .metrics import SegmentationMetrics, dice_from_counts, foreground_mean, iou_from_counts
from .predict import predict_classes


@dataclass
class Evaluation:
    """The per-image table of an evaluation, with the confusion counts summed over every pixel."""

    rows: list[dict]
    counts: np.ndarray  # (classes, 3): true positives, false positives, false negatives
    names: list[str]

    def dice(self) -> np.ndarray:
        """Per-class Dice over all pixels of all images."""
        return dice_from_counts(self.counts)

    def iou(self) -> np.ndarray:
        """Per-class IoU over all pixels of all images."""
        return iou_from_counts(self.counts)

    def foreground_dice(self) -> float:
        """The score a run is judged by: Dice over all pixels, averaged over the non-background classes."""
        return foreground_mean(self.dice())

    def per_image_foreground_dice(self) -> list[float]:
        return [foreground_mean([r[f"dice_{n}"] for n in self.names]) for r in self.rows]

    def summary(self) -> tuple[dict, dict]:
        """Two more rows for the table: the mean over images, and Dice/IoU pooled over all pixels."""
        keys = [k for k in self.rows[0] if k != "name"]
        mean = {"name": "mean (per image)", **{k: float(np.mean([r[k] for r in self.rows])) for k in keys}}
        d, j = self.dice(), self.iou()
        pooled = {
            "name": "all pixels",
            **{f"dice_{n}": float(d[c]) for c, n in enumerate(self.names)},
            **{f"iou_{n}": float(j[c]) for c, n in enumerate(self.names)},
        }
        return mean, pooled


def slice_names(name: str, slices: int) -> list[str]:
    """The names a stack's slices are reported and written under (name_000, ...); a single image keeps its name."""
    return [name] if slices == 1 else [f"{name}_{k:03d}" for k in range(slices)]


def evaluate(
    model,
    images: str | Path | Sequence,
    masks: str | Path | Sequence,
    *,
    classes: ClassTable | None = None,
    normalize: str = "dtype",
    names: Sequence[str] | None = None,
    mask_suffix: str = "",
    **predict_kw,
) -> Evaluation:
    """Predict every image with `model` (overlap-tile, `unetx.app.predict.predict_classes`) and score it against
    its mask.

    images, masks: two folders (paired by file stem; masks are encoded by `classes`, the model's ClassTable, and
    every bad mask is reported before any prediction runs), or two sequences: images as (H, W[, C]) arrays or
    (C, H, W) tensors, masks as (H, W) class-index arrays. predict_kw: tile, overlap, blend, tta, batch_size, amp,
    progress (see predict_classes).
    """
    if isinstance(images, (str, Path)):
        if classes is None:
            raise InputError("evaluate: images given as a folder need the model's class table (classes=)")
        return _evaluate_folders(model, images, masks, classes, normalize, mask_suffix, **predict_kw)
    images, masks = list(images), list(masks)
    if len(images) != len(masks):
        raise InputError(f"evaluate: {len(images)} images but {len(masks)} masks")
    if classes is None:
        out = model.config["out_channels"]
        classes = ClassTable.labels(out if out > 1 else 2)  # one sigmoid logit is a binary model
    names = list(names) if names is not None else [f"image_{i:03d}" for i in range(len(images))]
    metrics = SegmentationMetrics(classes.num_classes)
    for image, target, name in zip(images, masks, names):
        pred, _ = predict_classes(model, image, normalize=normalize, **predict_kw)
        metrics.update(pred, np.asarray(target), name)
    return _result(metrics, classes)


def _evaluate_folders(
    model, images, masks, table: ClassTable, normalize: str, mask_suffix: str, **predict_kw
) -> Evaluation:
    pairs = pair_files(images, masks, mask_suffix)
    in_ch = model.config["in_channels"]
    problems = []
    for p in pairs:
        lossy = p.mask_path.suffix.lower() in LOSSY_SUFFIXES
        for k in range(p.image.shape[0]):
            try:
                table.encode(p.mask[k if p.mask.shape[0] > 1 else 0], p.mask_path.name, lossy=lossy)
                image_to_chw(p.image[k][:1, :1], in_ch, normalize, p.image_path.name)
            except InputError as e:
                problems.append(str(e))
                break
    if problems:  # every bad mask reported before any prediction runs
        raise InputError("cannot evaluate:\n  - " + "\n  - ".join(problems))
    metrics = SegmentationMetrics(table.num_classes)
    for p in pairs:
        lossy = p.mask_path.suffix.lower() in LOSSY_SUFFIXES
        for k, name in enumerate(slice_names(p.name, p.image.shape[0])):
            target = table.encode(p.mask[k if p.mask.shape[0] > 1 else 0], p.mask_path.name, lossy=lossy)
            pred, _ = predict_classes(model, p.image[k], normalize=normalize, **predict_kw)
            metrics.update(pred, target, name)
    return _result(metrics, table)


def _result(metrics: SegmentationMetrics, table: ClassTable) -> Evaluation:
    rows = []
    for r in metrics.per_image:
        row = {"name": r["name"]}
        for c, cname in enumerate(table.names):
            row[f"dice_{cname}"] = float(r["dice"][c])
        for c, cname in enumerate(table.names):
            row[f"iou_{cname}"] = float(r["iou"][c])
        rows.append(row)
    return Evaluation(rows, metrics.counts, list(table.names))

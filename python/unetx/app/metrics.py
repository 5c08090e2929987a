"""Per-class Dice and IoU from hard predictions.

    m = unetx.metrics.SegmentationMetrics(num_classes=2)
    m.update(pred, target)          # class-index maps, any shape, numpy or torch
    m.dice(), m.iou()               # per class, over all pixels seen (counts summed, then the ratio)
    m.per_image                     # one dict per update: that image's per-class Dice and IoU

Convention: a class absent from both prediction and target scores 1.0 (nothing to find, nothing found).
"""

from __future__ import annotations

import numpy as np
import torch


def confusion_counts(pred, target, num_classes: int) -> np.ndarray:
    """(num_classes, 3) int64 array of true positives, false positives, false negatives per class."""
    p = torch.as_tensor(pred).reshape(-1).long()
    t = torch.as_tensor(target).reshape(-1).long().to(p.device)
    if p.numel() != t.numel():
        raise ValueError(f"prediction has {p.numel()} pixels but the target has {t.numel()}")
    joint = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    cm = joint[: num_classes * num_classes].reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    return np.stack([tp, fp, fn], axis=1)


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    tp, fp, fn = (counts[..., i].astype(np.float64) for i in range(3))
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)


def iou_from_counts(counts: np.ndarray) -> np.ndarray:
    tp, fp, fn = (counts[..., i].astype(np.float64) for i in range(3))
    denom = tp + fp + fn
    return np.where(denom > 0, tp / np.maximum(denom, 1), 1.0)


def dice(pred, target, num_classes: int) -> np.ndarray:
    """Per-class Dice of one prediction."""
    return dice_from_counts(confusion_counts(pred, target, num_classes))


def iou(pred, target, num_classes: int) -> np.ndarray:
    """Per-class IoU (Jaccard) of one prediction."""
    return iou_from_counts(confusion_counts(pred, target, num_classes))


def foreground_mean(per_class: np.ndarray) -> float:
    """The score a run is judged by: the mean over the non-background classes (class 1 alone when binary)."""
    per_class = np.asarray(per_class, dtype=np.float64)
    return float(per_class[1:].mean()) if len(per_class) > 1 else float(per_class[0])


class SegmentationMetrics:
    """Accumulates confusion counts per class over images; Dice/IoU over all pixels, and per image."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.counts = np.zeros((num_classes, 3), dtype=np.int64)
        self.per_image: list[dict] = []

    def update(self, pred, target, name: str | None = None) -> np.ndarray:
        c = confusion_counts(pred, target, self.num_classes)
        self.counts += c
        self.per_image.append(
            {
                "name": name if name is not None else str(len(self.per_image)),
                "dice": dice_from_counts(c),
                "iou": iou_from_counts(c),
            }
        )
        return c

    def add_counts(self, counts: np.ndarray) -> None:
        self.counts += np.asarray(counts, dtype=np.int64)

    def dice(self) -> np.ndarray:
        return dice_from_counts(self.counts)

    def iou(self) -> np.ndarray:
        return iou_from_counts(self.counts)

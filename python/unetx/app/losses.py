"""Segmentation losses as small composable modules. Every loss is called as `loss(logits, target, weight=None)`:

logits (N, K, H, W): K = number of classes (softmax), or K = 1 for a binary sigmoid output;
target (N, H, W) int64 class indices; weight (N, H, W) optional per-pixel weights (the U-Net paper's weight map).

loss = unetx.losses.make_loss("ce+dice")     # the default: cross-entropy plus soft Dice
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSSES = ("ce+dice", "ce", "dice", "bce", "bce+dice", "mse")


def probabilities(logits: Tensor) -> Tensor:
    """Per-class probabilities (N, K, H, W); a single sigmoid channel becomes the two classes (1 - p, p)."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits.float())
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits.float(), dim=1)


def num_output_channels(loss: str, num_classes: int) -> int:
    """The network's output channels for a loss: one sigmoid channel for BCE (binary only), else one per class."""
    if loss.startswith("bce"):
        if num_classes != 2:
            raise ValueError(
                f"loss '{loss}' is for two classes (one sigmoid output); the masks have {num_classes} "
                "classes: use 'ce' or 'ce+dice'"
            )
        return 1
    return num_classes


def _weighted_mean(per_pixel: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return per_pixel.mean()
    return (per_pixel * weight).sum() / weight.sum().clamp_min(1e-12)


class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy, per-pixel weighted as in the U-Net paper when a weight map is given."""

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return _weighted_mean(F.cross_entropy(logits.float(), target, reduction="none"), weight)


class BCELoss(nn.Module):
    """Binary cross-entropy on a single logit channel (class 1 = foreground), optionally per-pixel weighted."""

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        if logits.shape[1] != 1:
            raise ValueError(f"BCELoss: expected 1 logit channel, got {logits.shape[1]}")
        per_pixel = F.binary_cross_entropy_with_logits(logits[:, 0].float(), target.float(), reduction="none")
        return _weighted_mean(per_pixel, weight)


class DiceLoss(nn.Module):
    """Soft Dice loss: 1 - mean over classes of 2 sum(p t) / (sum p + sum t), summed over the whole batch.

    include_background=False leaves class 0 out of the mean (common for sparse foreground); `smooth` keeps a
    class absent from both prediction and target at loss 0 instead of 0/0.
    """

    def __init__(self, include_background: bool = True, smooth: float = 1.0):
        super().__init__()
        self.include_background = include_background
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        p = probabilities(logits)
        k = p.shape[1]
        onehot = F.one_hot(target, k).permute(0, 3, 1, 2).to(p.dtype)
        dims = (0, 2, 3)
        inter = (p * onehot).sum(dims)
        denom = p.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + self.smooth) / (denom + self.smooth)
        if not self.include_background and k > 1:
            dice = dice[1:]
        return 1 - dice.mean()


class MSELoss(nn.Module):
    """Mean squared error between class probabilities and the one-hot target (the seed project's loss)."""

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        p = probabilities(logits)
        onehot = F.one_hot(target, p.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
        return _weighted_mean((p - onehot).square().mean(1), weight)


class SumLoss(nn.Module):
    """The sum of several losses (e.g. cross-entropy + Dice); the weight map goes to each."""

    def __init__(self, *terms: nn.Module):
        super().__init__()
        self.terms = nn.ModuleList(terms)

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return sum(t(logits, target, weight) for t in self.terms)


def make_loss(name: str = "ce+dice") -> nn.Module:
    """A loss by name: "ce+dice" (default), "ce", "dice", "bce", "bce+dice", "mse".

    The weight map, when given, weights the cross-entropy / BCE / MSE terms; soft Dice is a ratio over the whole
    batch and ignores it.
    """
    parts = {"ce": CrossEntropyLoss, "bce": BCELoss, "dice": DiceLoss, "mse": MSELoss}
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    terms = [parts[p]() for p in name.split("+")]
    return terms[0] if len(terms) == 1 else SumLoss(*terms)

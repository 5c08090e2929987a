"""Losses against their formulas written out by hand; Dice/IoU on counted examples and against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from unetx import losses, metrics


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def targets(n, h, w, k, seed=1):
    return torch.randint(0, k, (n, h, w), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- metrics
def test_dice_iou_on_a_counted_example():
    target = np.zeros((4, 4), int)
    target[0, :4] = 1  # 4 foreground pixels
    pred = np.zeros((4, 4), int)
    pred[0, :3] = 1  # 3 found
    pred[3, 3] = 1  # 1 false positive
    d = metrics.dice(pred, target, 2)
    j = metrics.iou(pred, target, 2)
    assert d[1] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert j[1] == pytest.approx(3 / 5)
    assert d[0] == pytest.approx(2 * 11 / (2 * 11 + 1 + 1))


def test_counts_match_brute_force_and_empty_class_scores_one():
    g = np.random.default_rng(0)
    pred, target = g.integers(0, 4, (3, 20, 21)), g.integers(0, 3, (3, 20, 21))
    counts = metrics.confusion_counts(torch.as_tensor(pred), target, 4)
    for c in range(4):
        tp = np.sum((pred == c) & (target == c))
        fp = np.sum((pred == c) & (target != c))
        fn = np.sum((pred != c) & (target == c))
        assert counts[c].tolist() == [tp, fp, fn]
    assert metrics.dice(np.zeros((5, 5), int), np.zeros((5, 5), int), 3).tolist() == [1.0, 1.0, 1.0]
    assert metrics.iou(np.ones((5, 5), int), np.zeros((5, 5), int), 2).tolist() == [0.0, 0.0]


def test_accumulator_pools_pixels_and_keeps_per_image_scores():
    m = metrics.SegmentationMetrics(2)
    a_t, a_p = np.array([[1, 1], [0, 0]]), np.array([[1, 0], [0, 0]])
    b_t, b_p = np.array([[1, 1], [1, 1]]), np.array([[1, 1], [1, 1]])
    m.update(a_p, a_t, "a")
    m.update(b_p, b_t, "b")
    assert [r["name"] for r in m.per_image] == ["a", "b"]
    assert m.per_image[0]["dice"][1] == pytest.approx(2 / 3) and m.per_image[1]["dice"][1] == 1.0
    assert m.dice()[1] == pytest.approx(2 * 5 / (2 * 5 + 0 + 1))  # pooled over both images
    assert metrics.foreground_mean(m.dice()) == m.dice()[1]


# ---------------------------------------------------------------------------------------------- losses
def test_cross_entropy_weighted_equals_formula():
    logits, t = randn(2, 3, 5, 6), targets(2, 5, 6, 3)
    w = torch.rand(2, 5, 6, generator=torch.Generator().manual_seed(2)) + 0.1
    logp = torch.log_softmax(logits.double(), 1)
    nll = -logp.gather(1, t[:, None])[:, 0]
    expected = (nll * w).sum() / w.sum()
    got = losses.CrossEntropyLoss()(logits, t, w)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses.CrossEntropyLoss()(logits, t).item() == pytest.approx(nll.mean().item(), rel=1e-5)


def test_bce_equals_formula():
    logits, t = randn(2, 1, 5, 6), targets(2, 5, 6, 2)
    p = torch.sigmoid(logits.double()[:, 0])
    expected = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    assert losses.BCELoss()(logits, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_soft_dice_equals_formula_and_is_zero_when_perfect():
    logits, t = randn(2, 3, 7, 5), targets(2, 7, 5, 3)
    p = torch.softmax(logits.double(), 1)
    oh = F.one_hot(t, 3).permute(0, 3, 1, 2).double()
    inter, denom = (p * oh).sum((0, 2, 3)), (p + oh).sum((0, 2, 3))
    expected = 1 - ((2 * inter + 1) / (denom + 1)).mean()
    assert losses.DiceLoss()(logits, t).item() == pytest.approx(expected.item(), rel=1e-5)
    no_bg = 1 - ((2 * inter + 1) / (denom + 1))[1:].mean()
    assert losses.DiceLoss(include_background=False)(logits, t).item() == pytest.approx(no_bg.item(), rel=1e-5)
    perfect = F.one_hot(t, 3).permute(0, 3, 1, 2).float() * 40
    assert losses.DiceLoss()(perfect, t).item() < 1e-6


def test_mse_and_sum_and_names():
    logits, t = randn(2, 2, 4, 4), targets(2, 4, 4, 2)
    p = torch.softmax(logits.double(), 1)
    oh = F.one_hot(t, 2).permute(0, 3, 1, 2).double()
    assert losses.MSELoss()(logits, t).item() == pytest.approx(((p - oh) ** 2).mean().item(), rel=1e-5)
    combined = losses.make_loss("ce+dice")(logits, t)
    assert combined.item() == pytest.approx(
        (losses.CrossEntropyLoss()(logits, t) + losses.DiceLoss()(logits, t)).item()
    )
    for name in losses.LOSSES:
        k = 1 if name.startswith("bce") else 2
        x = randn(2, k, 4, 4).requires_grad_()
        loss = losses.make_loss(name)(x, t)
        loss.backward()
        assert torch.isfinite(loss) and x.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="unknown loss"):
        losses.make_loss("focal")
    with pytest.raises(ValueError, match="two classes"):
        losses.num_output_channels("bce", 3)
    assert losses.num_output_channels("bce+dice", 2) == 1 and losses.num_output_channels("ce", 5) == 5


def test_probabilities_of_one_sigmoid_channel_are_two_classes():
    x = randn(1, 1, 3, 3)
    p = losses.probabilities(x)
    assert p.shape == (1, 2, 3, 3)
    torch.testing.assert_close(p[:, 1], torch.sigmoid(x[:, 0]))
    torch.testing.assert_close(p.sum(1), torch.ones(1, 3, 3))

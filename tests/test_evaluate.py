"""unetx.app.evaluate: the per-image table `unetx evaluate` and `unetx demo` print, from folders or from arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import unetx
from PIL import Image
from unetx.app.data import ClassTable, InputError
from unetx.app.evaluate import evaluate
from unetx.app.metrics import dice


def _model():
    torch.manual_seed(0)
    return unetx.UNet(1, 2, base_channels=4, depth=2).eval()


def test_arrays_give_one_row_per_image_and_pooled_scores():
    model = _model()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (24, 20), dtype=np.uint8) for _ in range(3)]
    masks = [(im > 128).astype(np.uint8) for im in images]
    result = evaluate(model, images, masks, names=["a", "b", "c"], tile=64)
    assert [r["name"] for r in result.rows] == ["a", "b", "c"]
    assert set(result.rows[0]) == {"name", "dice_class0", "dice_class1", "iou_class0", "iou_class1"}
    from unetx.app.predict import predict_classes

    pred, _ = predict_classes(model, images[1], tile=64)
    np.testing.assert_allclose([result.rows[1]["dice_class0"], result.rows[1]["dice_class1"]], dice(pred, masks[1], 2))
    mean, pooled = result.summary()
    assert mean["dice_class1"] == pytest.approx(np.mean([r["dice_class1"] for r in result.rows]))
    assert pooled["dice_class1"] == pytest.approx(result.dice()[1])
    assert result.foreground_dice() == pytest.approx(result.dice()[1])


def test_folders_are_paired_and_bad_masks_reported_before_predicting(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    rng = np.random.default_rng(1)
    for name in ("x", "y"):
        im = rng.integers(0, 255, (16, 16), dtype=np.uint8)
        Image.fromarray(im).save(tmp_path / "img" / f"{name}.png")
        Image.fromarray(((im > 100) * 255).astype(np.uint8)).save(tmp_path / "msk" / f"{name}.png")
    table = ClassTable.binary()
    result = evaluate(_model(), tmp_path / "img", tmp_path / "msk", classes=table, tile=64)
    assert [r["name"] for r in result.rows] == ["x", "y"]
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(tmp_path / "msk" / "y.png")
    with pytest.raises(InputError, match="cannot evaluate"):
        evaluate(_model(), tmp_path / "img", tmp_path / "msk", classes=table, tile=64)

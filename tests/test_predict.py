"""Overlap-tile prediction: with enough overlap it equals a whole-image prediction away from the image border."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import unetx
from conftest import randomise_batchnorm
from unetx.app.data import InputError
from unetx.app.predict import plan_tiles, predict_classes, predict_strips, predict_tiled
from unetx.nn.common import receptive_margin


def model(depth=2, base=4, out=3, in_ch=1, seed=0):
    torch.manual_seed(seed)
    m = unetx.UNet(in_ch, out, base_channels=base, depth=depth)
    randomise_batchnorm(m, bias=0.3)  # non-trivial eval-mode BatchNorm
    return m.eval()


def image(h, w, c=1, seed=1):
    return torch.rand(c, h, w, generator=torch.Generator().manual_seed(seed))


def whole(m, x, output="logits"):
    with torch.no_grad():
        y = m(x[None])[0]
    return (y if output == "logits" else unetx.losses.probabilities(y[None])[0]).numpy()


@pytest.mark.parametrize("depth,h,w,tile", [(2, 150, 203, 96), (3, 181, 133, 176)])
@pytest.mark.parametrize("blend", ["crop", "gaussian"])
def test_tiled_equals_whole_image_in_the_interior(depth, h, w, tile, blend):
    m = model(depth)
    x = image(h, w)
    margin = receptive_margin(depth)
    tiled = predict_tiled(m, x, tile=tile, overlap=margin, blend=blend, output="logits")
    ref = whole(m, x)
    inner = (slice(None), slice(margin, h - margin), slice(margin, w - margin))
    scale = np.abs(ref).max()
    assert tiled.shape == ref.shape
    assert np.abs(tiled - ref)[inner].max() <= 1e-5 * scale
    assert plan_tiles(h, w, tile, margin, 2**depth, blend).num_tiles > 4  # it really tiled
    probs = predict_tiled(m, x, tile=tile, overlap=margin, blend=blend)
    np.testing.assert_allclose(probs[inner], whole(m, x, "probabilities")[inner], atol=1e-5)


def test_too_little_overlap_shows_seams():
    # the same comparison with no context fails: the exactness above depends on the overlap
    m = model(2)
    x = image(150, 203)
    margin = receptive_margin(2)
    tiled = predict_tiled(m, x, tile=48, overlap=0, blend="crop", output="logits")
    ref = whole(m, x)
    inner = (slice(None), slice(margin, -margin), slice(margin, -margin))
    assert np.abs(tiled - ref)[inner].max() > 1e-3 * np.abs(ref).max()


def test_uint8_array_input_is_normalised_per_tile():
    m = model(2, in_ch=3)
    arr = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    as_float = torch.from_numpy(np.moveaxis(arr.astype(np.float32) / 255, -1, 0).copy())
    a = predict_tiled(m, arr, tile=64, overlap=12)
    b = predict_tiled(m, as_float, tile=64, overlap=12)
    np.testing.assert_allclose(a, b, atol=1e-6)
    grey = arr[..., 0]
    g = predict_tiled(m, grey, tile=64, overlap=12)  # grey into an RGB model: the channel is repeated
    assert g.shape == (3, 70, 90)


def test_strips_cover_the_image_once_in_order():
    m = model(2)
    x = image(300, 70)
    strips = list(predict_strips(m, x, tile=96, overlap=16, blend="gaussian"))
    assert len(strips) > 3
    y = 0
    for y0, s in strips:
        assert y0 == y and s.shape[0] == 3 and s.shape[2] == 70 and s.shape[1] <= 96 - 2 * 16
        y += s.shape[1]
    assert y == 300
    np.testing.assert_allclose(
        np.concatenate([s for _, s in strips], axis=1),
        predict_tiled(m, x, tile=96, overlap=16, blend="gaussian"),
        atol=0,
    )
    classes, probs = predict_classes(m, x, tile=96, overlap=16, keep_probabilities=True)
    full = predict_tiled(m, x, tile=96, overlap=16)
    assert np.array_equal(classes, full.argmax(0))
    assert np.abs(probs[1].astype(np.float32) / 255 - full[1]).max() <= 0.5 / 255 + 1e-6


def test_tta_averages_the_four_flips():
    m = model(2)
    x = image(64, 96)  # multiples of 2**depth: flipping keeps the pooling grid
    margin = receptive_margin(2)
    tta = predict_tiled(m, x, tile=128, overlap=margin, tta=True)
    flips = [whole(m, x.flip(d), "probabilities") for d in ((), (2,), (1,), (1, 2))]
    flips = [np.flip(f, tuple(a for a in d)) if d else f for f, d in zip(flips, ((), (2,), (1,), (1, 2)))]
    inner = (slice(None), slice(margin, -margin), slice(margin, -margin))
    np.testing.assert_allclose(tta[inner], np.mean(flips, axis=0)[inner], atol=1e-5)
    assert np.abs(tta - predict_tiled(m, x, tile=128, overlap=margin)).max() > 1e-4


def test_sigmoid_model_gives_two_class_probabilities_and_mode_is_restored():
    m = model(2, out=1).train()
    p = predict_tiled(m, image(40, 50), tile=64, overlap=8)
    assert p.shape == (2, 40, 50)
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-6)
    assert m.training


def test_tile_too_small_is_an_input_error():
    m = model(3)
    with pytest.raises(InputError, match="tile 64 is too small"):
        predict_tiled(m, image(100, 100), tile=64, overlap=40)
    with pytest.raises(InputError, match="channels"):
        predict_tiled(model(2, in_ch=1), np.zeros((30, 30, 3), np.uint8), tile=64, overlap=8)

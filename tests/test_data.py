"""unetx.app.data on real files: reading PNG/JPEG/TIFF variants, pairing, class tables, augmentation, weight maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy import ndimage
from unetx import data
from unetx.app.data import Augment, ClassTable, InputError

ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012"


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------- reading
def test_read_png_variants(tmp_path):
    g8 = rng().integers(0, 256, (17, 23), dtype=np.uint8)
    g16 = rng(1).integers(0, 65536, (17, 23), dtype=np.uint16)
    rgb = rng(2).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((17, 23, 1), 128, np.uint8)], axis=-1)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.bmp")
    a = data.read_image(tmp_path / "g8.png")
    assert a.shape == (1, 17, 23, 1) and a.dtype == np.uint8 and np.array_equal(a[0, ..., 0], g8)
    a = data.read_image(tmp_path / "g16.png")
    assert a.shape == (1, 17, 23, 1) and a.dtype == np.uint16 and np.array_equal(a[0, ..., 0], g16)
    for name in ("rgb.png", "rgba.png", "rgb.bmp"):
        a = data.read_image(tmp_path / name)
        assert a.shape == (1, 17, 23, 3) and np.array_equal(a[0], rgb), name
    f = data.to_float(data.read_image(tmp_path / "g16.png"))
    np.testing.assert_allclose(f[0, ..., 0], g16 / 65535.0, rtol=1e-6)
    assert data.to_float(data.read_image(tmp_path / "g8.png")).max() <= 1.0


def test_read_palette_mask_gives_indices(tmp_path):
    idx = rng().integers(0, 4, (9, 11), dtype=np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    img.save(tmp_path / "p.png")
    assert np.array_equal(data.read_image(tmp_path / "p.png", mask=True)[0, ..., 0], idx)
    colours = data.read_image(tmp_path / "p.png")[0]  # as an image: the palette colours
    assert colours.shape == (9, 11, 3) and np.array_equal(
        colours[idx == 1], np.tile([255, 0, 0], ((idx == 1).sum(), 1))
    )


def test_read_jpeg(tmp_path):
    g = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))
    Image.fromarray(g).save(tmp_path / "a.jpg", quality=95)
    a = data.read_image(tmp_path / "a.jpg")
    assert a.shape == (1, 30, 40, 1) and np.abs(a[0, ..., 0].astype(int) - g).max() < 8


def test_read_tiff_stack_rgb_and_16bit(tmp_path):
    stack = rng().integers(0, 65536, (3, 20, 24), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    a = data.read_image(tmp_path / "stack.tif")
    assert a.shape == (3, 20, 24, 1) and a.dtype == np.uint16 and np.array_equal(a[..., 0], stack)
    rgb = rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tiff", rgb, photometric="rgb")
    a = data.read_image(tmp_path / "rgb.tiff")
    assert a.shape == (1, 20, 24, 3) and np.array_equal(a[0], rgb)
    single = rng(2).integers(0, 256, (20, 24), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "one.tif", single)
    assert data.read_image(tmp_path / "one.tif").shape == (1, 20, 24, 1)


@pytest.mark.parametrize("kind", ["truncated_png", "garbage", "truncated_tiff", "empty"])
def test_corrupt_files_raise_input_error_naming_the_file(tmp_path, kind):
    g = rng().integers(0, 256, (64, 64), dtype=np.uint8)
    if kind == "truncated_png":
        Image.fromarray(g).save(tmp_path / "x.png")
        raw = (tmp_path / "x.png").read_bytes()
        (tmp_path / "x.png").write_bytes(raw[: len(raw) // 2])
        path = tmp_path / "x.png"
    elif kind == "garbage":
        path = tmp_path / "x.png"
        path.write_bytes(b"this is not an image at all" * 10)
    elif kind == "truncated_tiff":
        tifffile.imwrite(tmp_path / "x.tif", np.stack([g] * 4), photometric="minisblack")
        raw = (tmp_path / "x.tif").read_bytes()
        path = tmp_path / "x.tif"
        path.write_bytes(raw[:300])
    else:
        path = tmp_path / "x.png"
        path.write_bytes(b"")
    with pytest.raises(InputError, match="x.tif|x.png"):
        data.read_image(path)


# ---------------------------------------------------------------------------------------------- pairing
def _write(folder: Path, name: str, arr: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(folder / name)


def test_pairing_reports_every_problem_by_name(tmp_path):
    img, msk = tmp_path / "images", tmp_path / "masks"
    a = rng().integers(0, 256, (16, 16), dtype=np.uint8)
    m = (a > 128).astype(np.uint8) * 255
    _write(img, "good.png", a), _write(msk, "good.png", m)
    _write(img, "lonely_image.png", a)
    _write(msk, "lonely_mask.png", m)
    _write(img, "wrong_size.png", a), _write(msk, "wrong_size.png", m[:10])
    _write(img, "twice.png", a), _write(img, "twice.tif", a), _write(msk, "twice.png", m)
    (img / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _write(msk, "broken.png", m)
    (img / "notes.txt").write_text("ignored: not an image suffix")
    with pytest.raises(InputError) as e:
        data.pair_files(img, msk)
    msg = str(e.value)
    for name in ("lonely_image.png", "lonely_mask.png", "wrong_size.png", "twice", "broken.png"):
        assert name in msg, (name, msg)
    assert "5 problems" in msg
    assert "good.png" not in msg


def test_pairing_with_mask_suffix_and_empty_folder(tmp_path):
    img, msk = tmp_path / "images", tmp_path / "masks"
    a = rng().integers(0, 256, (16, 16), dtype=np.uint8)
    for i in range(3):
        _write(img, f"{i}.png", a)
        _write(msk, f"{i}_mask.png", (a > 100).astype(np.uint8))
    pairs = data.pair_files(img, msk, mask_suffix="_mask")
    assert [p.name for p in pairs] == ["0", "1", "2"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        data.pair_files(tmp_path / "empty", msk)
    with pytest.raises(InputError, match="does not exist"):
        data.pair_files(tmp_path / "nope", msk)


# ---------------------------------------------------------------------------------------------- classes
def test_infer_class_table_binary_polarity_labels_colour():
    m = np.zeros((1, 8, 8, 1), np.uint8)
    m[0, 2:5, 2:5] = 255
    t = data.infer_class_table([m])
    assert t.kind == "binary" and t.values == [0, 255]
    assert data.infer_class_table([m], foreground="dark").values == [255, 0]
    cls = t.encode(m[0])
    assert cls.sum() == 9 and np.array_equal(t.decode(cls), m[0, ..., 0])
    dark = data.infer_class_table([m], foreground="dark").encode(m[0])
    assert dark.sum() == 64 - 9  # the dark value is class 1

    lab = np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1) % 4
    t = data.infer_class_table([lab])
    assert t.kind == "labels" and t.num_classes == 4 and np.array_equal(t.encode(lab[0]), lab[0, ..., 0])
    assert data.infer_class_table([lab], num_classes=6).num_classes == 6
    with pytest.raises(InputError, match="--classes 4"):
        data.infer_class_table([lab], num_classes=3)
    with pytest.raises(InputError, match="two values"):
        data.infer_class_table([lab], mode="binary")

    col = np.zeros((1, 8, 8, 3), np.uint8)
    col[0, :4] = (255, 0, 0)
    col[0, 6:] = (0, 0, 255)
    t = data.infer_class_table([col])
    assert t.kind == "colour" and t.values == [(0, 0, 0), (0, 0, 255), (255, 0, 0)]
    cls = t.encode(col[0])
    assert np.array_equal(t.decode(cls), col[0])


def test_class_table_rejects_unknown_values_and_accepts_lossy_nearest():
    t = ClassTable.labels(3)
    m = np.array([[0, 1], [2, 5]], np.uint8)[..., None]
    with pytest.raises(InputError, match=r"class values \[5\].*3 classes"):
        t.encode(m, "m.png")
    b = ClassTable.binary(0, 255)
    noisy = np.array([[3, 250], [120, 140]], np.uint8)[..., None]
    with pytest.raises(InputError, match="not in the class table"):
        b.encode(noisy, "m.png")
    assert b.encode(noisy, "m.jpg", lossy=True).tolist() == [[0, 1], [0, 1]]
    c = ClassTable("colour", [(0, 0, 0), (255, 0, 0)])
    with pytest.raises(InputError, match=r"\(0, 255, 0\)"):
        c.encode(np.array([[[0, 255, 0]]], np.uint8), "c.png")


def test_class_table_json_and_dict_round_trip(tmp_path):
    (tmp_path / "t.json").write_text(
        '{"kind": "colour", "values": [[0,0,0],[255,0,0],[0,255,0]], "names": ["bg", "cell", "edge"]}'
    )
    t = ClassTable.from_json(tmp_path / "t.json")
    assert t.names == ["bg", "cell", "edge"] and t.values[2] == (0, 255, 0)
    assert ClassTable.from_dict(t.to_dict()) == t
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        ClassTable.from_json(tmp_path / "bad.json")


def test_load_samples_lists_every_bad_mask(tmp_path):
    img, msk = tmp_path / "images", tmp_path / "masks"
    a = rng().integers(0, 256, (16, 16), dtype=np.uint8)
    for i, top in enumerate((1, 2, 7, 9)):
        _write(img, f"{i}.png", a)
        _write(msk, f"{i}.png", (np.arange(256).reshape(16, 16) % (top + 1)).astype(np.uint8))
    pairs = data.pair_files(img, msk)
    with pytest.raises(InputError) as e:
        data.load_samples(pairs, ClassTable.labels(3))
    assert "2.png" in str(e.value) and "3.png" in str(e.value) and "0.png" not in str(e.value)


def test_isbi_slices_read_with_dark_foreground():
    if not (ISBI / "train" / "images").is_dir():
        pytest.skip(f"ISBI 2012 data not found at {ISBI}")
    pairs = data.pair_files(ISBI / "train" / "images", ISBI / "train" / "masks")
    assert len(pairs) == 30 and pairs[0].image.shape == (1, 512, 512, 1)
    table = data.infer_class_table([p.mask for p in pairs], foreground="dark")
    assert table.values == [255, 0]  # membranes (0, dark) are class 1
    samples = data.load_samples(pairs[:3], table)
    membrane = np.mean([s.target.mean() for s in samples])
    assert 0.1 < membrane < 0.4, membrane  # the SOURCE.md says ~22% membrane


# ---------------------------------------------------------------------------------------------- patches
def test_random_crop_pads_small_images_and_is_deterministic():
    s = data.Sample("a", rng().random((1, 20, 30), dtype=np.float32), np.zeros((20, 30), np.uint8))
    ds = data.PatchDataset([s], crop=48, augment=Augment(), patches_per_image=3, seed=5)
    x, t, w = ds[1]
    assert x.shape == (1, 48, 48) and t.shape == (48, 48) and w.shape == (48, 48) and t.dtype == torch.int64
    assert torch.equal(ds[1][0], x)  # same (seed, epoch, index) -> same patch
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], x)
    big = data.Sample("b", rng().random((1, 100, 90), dtype=np.float32), np.zeros((100, 90), np.uint8))
    crops = {tuple(data.random_crop(big.image, big.target, None, 32, rng(i))[0][0, 0, :3]) for i in range(10)}
    assert len(crops) > 5  # the crop position varies


def test_augmentation_moves_image_mask_and_weights_together():
    h = 64
    target = np.zeros((h, h), np.uint8)
    target[10:30, 5:25] = 1
    target[40:60, 35:50] = 2
    image = np.stack([target.astype(np.float32), np.arange(h * h, dtype=np.float32).reshape(h, h) / (h * h)])
    weight = target.astype(np.float32) * 3 + 1
    geometric = Augment(elastic=0.0, brightness=0.0, contrast=0.0)
    changed = 0
    for seed in range(8):
        x, t, w = geometric(image, target, weight, rng(seed))
        assert np.array_equal(x[0], t.astype(np.float32)) and np.array_equal(w, t.astype(np.float32) * 3 + 1)
        changed += not np.array_equal(x[1], image[1])
    assert changed > 0
    elastic = Augment(flips=False, rot90=False, elastic=1.0, brightness=0.0, contrast=0.0)
    x, t, w = elastic(image, target, weight, rng(3))
    assert not np.array_equal(t, target)  # it deformed
    agree = np.mean(np.abs(x[0] - t) < 0.5)  # bilinear image vs nearest mask differ only on edges
    assert agree > 0.97, agree
    assert set(np.unique(t)) <= {0, 1, 2}
    intensity = Augment(flips=False, rot90=False, elastic=0.0, brightness=0.2, contrast=0.3)
    x, t, w = intensity(image, target, weight, rng(4))
    assert np.array_equal(t, target) and np.array_equal(w, weight) and not np.allclose(x, image)


def test_elastic_displacement_is_smooth_and_about_sigma():
    # the deformation of a coordinate ramp recovers the displacement field: std ~ sigma, smooth (coarse grid)
    h = 96
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(h, dtype=np.float64), indexing="ij")
    img = np.stack([yy, xx]).astype(np.float32)
    (out, _, _) = data.elastic_deform(img, np.zeros((h, h), np.uint8), None, rng(0), sigma=4.0, grid=3)
    dy, dx = out[0] - yy, out[1] - xx
    inner = (slice(10, -10), slice(10, -10))
    assert 1.0 < np.std(np.concatenate([dy[inner].ravel(), dx[inner].ravel()])) < 8.0
    assert np.abs(np.diff(dy[inner], axis=0)).max() < 0.5  # smooth: neighbouring pixels move alike


# ---------------------------------------------------------------------------------------------- weight map
def _weight_map_bruteforce(target, class_weights, w0, sigma):
    labels, n = ndimage.label(target > 0)
    d = np.stack([ndimage.distance_transform_edt(labels != i) for i in range(1, n + 1)])
    d.sort(axis=0)
    border = w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))
    return np.asarray(class_weights)[target] + np.where(target == 0, border, 0)


def test_unet_weight_map_matches_the_paper_formula():
    target = np.zeros((60, 70), np.uint8)
    target[5:25, 5:30] = 1
    target[5:25, 32:60] = 1  # a 2-pixel gap: the border the paper's weights emphasise
    target[30:55, 10:40] = 1
    target[40:50, 50:65] = 1
    w = data.unet_weight_map(target, class_weights=[0.7, 1.3], w0=10.0, sigma=5.0)
    ref = _weight_map_bruteforce(target, [0.7, 1.3], 10.0, 5.0)
    # the bounding-box shortcut drops terms below w0 * exp(-8)
    np.testing.assert_allclose(w, ref, atol=10.0 * np.exp(-8) * 1.01)
    assert w[15, 30] > 8.0 and w[15, 30] > w[58, 2] + 7  # gap pixel vs far background

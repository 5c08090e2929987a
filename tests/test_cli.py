"""The real `unetx` command in a subprocess, on real image files: train, predict, evaluate, and bad input.

Each bad input must give one clear message (exit status 2, no traceback) before any work, and leave existing
checkpoints untouched.
"""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from unetx import checkpoint, metrics, synthetic
from unetx.app.data import ClassTable, read_image
from unetx.app.predict import predict_classes

TINY = ["--base-channels", "4", "--depth", "2", "--crop", "32", "--batch-size", "4", "--no-progress"]


def unetx_cli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    # one thread: the models here are tiny, and threads only add overhead (and contention on a shared CI box)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "unetx", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cells")
    paths = synthetic.write_dataset(root, n_train=6, n_val=2, size=48, large=0, seed=3)
    rng = np.random.default_rng(7)
    pred = root / "to_predict"
    pred.mkdir()
    big, _ = synthetic.cells(100, 130, rng)
    Image.fromarray(big).save(pred / "big.png")
    tifffile.imwrite(
        pred / "stack16.tif",
        np.stack([synthetic.cells(40, 56, rng)[0].astype(np.uint16) * 257] * 2),
        photometric="minisblack",
    )
    paths["predict"] = pred
    return paths


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    p = unetx_cli(
        "train",
        "--images",
        data["train_images"],
        "--masks",
        data["train_masks"],
        "--val-images",
        data["val_images"],
        "--val-masks",
        data["val_masks"],
        "--out",
        out,
        "--epochs",
        "2",
        *TINY,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return out, p


def test_train_writes_a_complete_run(run_dir):
    out, p = run_dir
    last_line = p.stdout.strip().splitlines()[-1]
    assert last_line.startswith("unetx train: done, 2 epochs") and "best val Dice" in last_line
    for name in ("last.pt", "best.pt", "history.csv", "history.npy", "curves.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "overlays").glob("*.png"))) == 2
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "val_loss", "val_dice_foreground", "val_iou_foreground", "lr", "images_per_s"} <= set(rows[0])
    hist = np.load(out / "history.npy", allow_pickle=False)
    assert hist["epoch"].tolist() == [1, 2]
    np.testing.assert_allclose(hist["train_loss"], [float(r["train_loss"]) for r in rows], rtol=1e-5)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["format"] == checkpoint.FORMAT and ckpt["epoch"] == 2 and ckpt["classes"]["kind"] == "binary"
    assert ckpt["config"]["base_channels"] == 4 and "optimizer" in ckpt and ckpt["train_args"]["crop"] == 32
    assert Image.open(out / "curves.png").size[0] > 100
    assert not list(out.glob(".*tmp"))  # no temporary files left behind


def test_predict_writes_masks_probabilities_overlays(run_dir, data, tmp_path):
    out, _ = run_dir
    pred_out = tmp_path / "pred"
    p = unetx_cli(
        "predict",
        "--checkpoint",
        out / "best.pt",
        "--input",
        data["predict"],
        "--output",
        pred_out,
        "--tile",
        "64",
        "--overlap",
        "12",
        "--blend",
        "gaussian",
        "--probabilities",
        "--no-progress",
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "3 images segmented" in p.stdout
    mask = np.asarray(Image.open(pred_out / "big_mask.png"))
    assert mask.shape == (100, 130) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(pred_out / "big_prob_foreground.png")).shape == (100, 130)
    assert np.asarray(Image.open(pred_out / "big_overlay.png")).shape == (100, 2 * 130 + 4, 3)
    for k in range(2):  # a 2-slice TIFF stack: one output per slice
        assert np.asarray(Image.open(pred_out / f"stack16_{k:03d}_mask.png")).shape == (40, 56)
    # the CLI's mask is the Python API's prediction
    model, ckpt = checkpoint.load_model(out / "best.pt")
    classes, _ = predict_classes(
        model, read_image(data["predict"] / "big.png")[0], tile=64, overlap=12, blend="gaussian"
    )
    assert np.array_equal(mask, (classes > 0).astype(np.uint8) * 255)


def test_evaluate_prints_and_writes_per_image_dice(run_dir, data, tmp_path):
    out, _ = run_dir
    csv_path = tmp_path / "eval.csv"
    p = unetx_cli(
        "evaluate",
        "--checkpoint",
        out / "best.pt",
        "--images",
        data["val_images"],
        "--masks",
        data["val_masks"],
        "--csv",
        csv_path,
        "--tile",
        "64",
        "--no-progress",
    )
    assert p.returncode == 0, p.stdout + p.stderr
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["000", "001", "mean (per image)", "all pixels"]
    assert "mean (per image)" in p.stdout and "dice_foreground" in p.stdout
    model, ckpt = checkpoint.load_model(out / "best.pt")
    table = ClassTable.from_dict(ckpt["classes"])
    dices = []
    for name in ("000", "001"):
        classes, _ = predict_classes(model, read_image(data["val_images"] / f"{name}.png")[0], tile=64)
        target = table.encode(read_image(data["val_masks"] / f"{name}.png", mask=True)[0])
        dices.append(metrics.dice(classes, target, 2)[1])
    assert [float(r["dice_foreground"]) for r in rows[:2]] == pytest.approx(dices, abs=1e-6)
    assert float(rows[2]["dice_foreground"]) == pytest.approx(np.mean(dices), abs=1e-6)


# ---------------------------------------------------------------------------------------------- bad input
def _write_pair(images: Path, masks: Path, name: str, size=32, mask=None):
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    img, m = synthetic.cells(size, size, np.random.default_rng(len(name)))
    Image.fromarray(img).save(images / f"{name}.png")
    Image.fromarray(m if mask is None else mask).save(masks / f"{name}.png")


class Foreign:
    """An arbitrary Python object in a checkpoint file: weights_only loading must refuse it."""

    def __init__(self):
        self.payload = [1, 2, 3]


def _bad_case(case: str, tmp: Path, data: dict, run: Path) -> tuple[list, list[str]]:
    """(CLI arguments, strings the error message must contain) for one bad input."""
    images, masks = tmp / "images", tmp / "masks"
    train = ["train", "--images", images, "--masks", masks, "--out", tmp / "out", "--epochs", "1", *TINY]
    predict = [
        "predict",
        "--checkpoint",
        run / "best.pt",
        "--input",
        data["predict"] / "big.png",
        "--output",
        tmp / "pred",
        "--no-progress",
    ]
    if case == "empty_folder":
        images.mkdir(), masks.mkdir()
        return train, ["holds no images", str(images)]
    if case == "missing_masks":
        _write_pair(images, masks, "a")
        _write_pair(images, masks, "b")
        (masks / "b.png").rename(masks / "c.png")
        return train, ["b.png has no mask", "c.png has no image", "2 problems"]
    if case == "corrupt_image":
        _write_pair(images, masks, "a")
        _write_pair(images, masks, "b")
        raw = (images / "b.png").read_bytes()
        (images / "b.png").write_bytes(raw[: len(raw) // 3])
        return train, ["b.png", "truncated"]
    if case == "more_classes_than_given":
        _write_pair(images, masks, "a", mask=(np.arange(32 * 32).reshape(32, 32) % 4).astype(np.uint8))
        return train + ["--classes", "2"], ["class values up to 3", "--classes 4"]
    if case == "mask_class_not_in_model":
        bad = np.zeros((32, 32), np.uint8)
        bad[:10] = 255
        bad[20:] = 128  # a third value: the binary model has two classes
        _write_pair(images, masks, "a", mask=bad)
        return (
            [
                "evaluate",
                "--checkpoint",
                run / "best.pt",
                "--images",
                images,
                "--masks",
                masks,
                "--csv",
                tmp / "e.csv",
                "--no-progress",
            ],
            ["a.png", "[128]", "2 classes"],
        )
    if case == "tile_too_small":
        return predict + ["--tile", "16"], ["--tile 16 is too small", "depth 2"]
    if case == "output_is_a_file":
        (tmp / "pred").write_text("a file")
        return predict, ["is a file"]
    if case == "train_out_is_a_file":
        _write_pair(images, masks, "a")
        (tmp / "out").write_text("a file")
        return train, ["is a file"]
    if case == "bare_state_dict":
        torch.save({"conv.weight": torch.randn(3, 3)}, tmp / "sd.pt")
        return predict[:2] + [tmp / "sd.pt"] + predict[3:], ["not a unetx checkpoint", "bare state_dict"]
    if case == "pickled_object":
        torch.save({"model": Foreign()}, tmp / "obj.pt")
        return predict[:2] + [tmp / "obj.pt"] + predict[3:], ["not a unetx checkpoint", "not loaded, for safety"]
    if case == "not_a_checkpoint":
        (tmp / "junk.pt").write_bytes(os.urandom(2000))
        return predict[:2] + [tmp / "junk.pt"] + predict[3:], ["not a unetx checkpoint"]
    if case == "junk_with_a_pickle_header":  # torch warns "pickle protocol 155" before it fails: still one line
        (tmp / "junk.pt").write_bytes(b"\x80\x9b" + os.urandom(2000))
        return predict[:2] + [tmp / "junk.pt"] + predict[3:], ["not a unetx checkpoint"]
    if case == "checkpoint_of_another_model":
        ckpt = torch.load(run / "best.pt", weights_only=True)
        ckpt["config"]["base_channels"] = 8  # the weights are a base-4 network's
        torch.save(ckpt, tmp / "other.pt")
        return predict[:2] + [tmp / "other.pt"] + predict[3:], ["do not fit"]
    if case == "resume_with_other_options":
        return ["train", "--resume", run, "--lr", "0.5"], ["--resume", "--lr"]
    raise AssertionError(case)


BAD_CASES = [
    "empty_folder",
    "missing_masks",
    "corrupt_image",
    "more_classes_than_given",
    "mask_class_not_in_model",
    "tile_too_small",
    "output_is_a_file",
    "train_out_is_a_file",
    "bare_state_dict",
    "pickled_object",
    "not_a_checkpoint",
    "junk_with_a_pickle_header",
    "checkpoint_of_another_model",
    "resume_with_other_options",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_clear_error(case, tmp_path, data, run_dir):
    run, _ = run_dir
    before = {f: sha(f) for f in run.glob("*.pt")}
    args, expected = _bad_case(case, tmp_path, data, run)
    p = unetx_cli(*args)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("unetx "), p.stderr
    assert p.stderr.count("error:") == 1, p.stderr
    for s in expected:
        assert s in p.stderr, (s, p.stderr)
    assert not (tmp_path / "out" / "last.pt").exists()  # nothing was trained
    if (tmp_path / "pred").is_dir():
        assert not list((tmp_path / "pred").glob("*.png"))  # nothing was predicted
    assert {f: sha(f) for f in run.glob("*.pt")} == before  # no checkpoint touched


def test_existing_run_is_not_overwritten(run_dir, data):
    run, _ = run_dir
    before = {f.name: sha(f) for f in run.glob("*.pt")}
    p = unetx_cli(
        "train", "--images", data["train_images"], "--masks", data["train_masks"], "--out", run, "--epochs", "1", *TINY
    )
    assert p.returncode == 2 and "already holds a run" in p.stderr and "--resume" in p.stderr, p.stderr
    assert {f.name: sha(f) for f in run.glob("*.pt")} == before

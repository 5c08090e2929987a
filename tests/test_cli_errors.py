"""Bad input to the real `unetx` command (a subprocess), one option or file at a time: each gets one line that names
the value and the fix, exit status 2, no traceback, and nothing written (no output folder, no checkpoint touched).
Also what the files a run writes look like from outside: their permissions follow the umask, and a process killed
while writing one leaves no temporary file. docs/cli-errors.md lists every case with its message.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from test_cli import TINY, _write_pair, data, run_dir, sha, unetx_cli  # noqa: F401 - fixtures
from unetx import checkpoint, synthetic
from unetx import data as udata

__all__ = ["data", "run_dir"]


def one_clear_error(p: subprocess.CompletedProcess, *expected: str, code: int = 2) -> str:
    """One message (one line, or one line and the list of every problem found), no traceback; returns it."""
    assert p.returncode == code, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("unetx ") and len(re.findall(r"^unetx \w+: ", p.stderr, re.M)) == 1, p.stderr
    assert all(ln.startswith(("unetx ", "  - ")) for ln in p.stderr.splitlines() if ln.strip()), p.stderr
    for s in expected:
        assert s in p.stderr, (s, p.stderr)
    return p.stderr.strip()


def train_args(tmp: Path, *extra) -> list:
    images, masks = tmp / "images", tmp / "masks"
    if not images.exists():
        _write_pair(images, masks, "a", size=48)
        _write_pair(images, masks, "b", size=48)
    return ["train", "--images", images, "--masks", masks, "--out", tmp / "out", "--epochs", "1", *TINY, *extra]


# ------------------------------------------------------------------------------------------ train options
TRAIN_OPTIONS = {
    "--lr inf": (["--lr", "inf"], ["--lr must be a finite number > 0", "got inf"]),
    "--lr nan": (["--lr", "nan"], ["--lr must be a finite number > 0", "got nan"]),
    "--lr 0": (["--lr", "0"], ["--lr must be a finite number > 0", "got 0.0"]),
    "--weight-decay -1": (["--weight-decay", "-1"], ["--weight-decay must be >= 0", "got -1.0"]),
    "--dropout 1": (["--dropout", "1"], ["--dropout must be in [0, 1)", "got 1.0"]),
    "--elastic 2": (["--elastic", "2"], ["--elastic must be a probability in [0, 1]", "got 2.0"]),
    "--sigma 0": (["--sigma", "0"], ["--sigma must be a positive number of pixels", "got 0.0"]),
    "--w0 nan": (["--w0", "nan"], ["--w0 must be >= 0", "got nan"]),
    "--brightness inf": (["--brightness", "inf"], ["--brightness must be >= 0", "got inf"]),
    "--seed -1": (["--seed", "-1"], ["--seed must be an integer >= 0", "got -1"]),
    "--seed 2**64": (["--seed", str(2**64)], ["--seed must be below 2**32"]),
    "--workers -2": (["--workers", "-2"], ["--workers must be an integer >= 0", "got -2"]),
    "--overlays -1": (["--overlays", "-1"], ["--overlays must be an integer >= 0", "got -1"]),
    "--classes 1": (["--classes", "1"], ["--classes must be an integer >= 2", "got 1"]),
    "--patches-per-image 0": (["--patches-per-image", "0"], ["--patches-per-image must be an integer >= 1"]),
    "--val-tile 2": (["--val-tile", "2"], ["--val-tile 2 is smaller than", "2**depth = 4"]),
    "--val-fraction nan": (["--val-fraction", "nan"], ["--val-fraction must be in [0, 1)", "got nan"]),
}


@pytest.mark.parametrize("case", list(TRAIN_OPTIONS))
def test_train_option_is_refused_before_anything_is_written(case, tmp_path):
    extra, expected = TRAIN_OPTIONS[case]
    one_clear_error(unetx_cli(*train_args(tmp_path, *extra)), *expected)
    assert not (tmp_path / "out").exists()


def test_train_names_the_file_with_non_finite_pixels(tmp_path):
    """A float TIFF with NaN pixels made every gradient and running statistic NaN while the loss stayed finite
    (see test_nonfinite.py); it is refused when read, naming the file and the first bad pixel."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    _write_pair(images, masks, "a", size=48)
    img, m = synthetic.cells(48, 48, np.random.default_rng(5))
    x = img.astype(np.float32) / 255
    x[7, 11] = np.nan
    x[20, 3] = np.inf
    tifffile.imwrite(images / "b.tif", x)
    Image.fromarray(m).save(masks / "b.png")
    line = one_clear_error(
        unetx_cli(*train_args(tmp_path)), "b.tif", "2 non-finite pixel values (NaN or Inf)", "row 7, column 11"
    )
    assert "a.png" not in line
    assert not (tmp_path / "out").exists()


def test_stop_message_names_no_checkpoint_that_does_not_exist(tmp_path):
    """Diverging in the first epoch: no last.pt exists, so the message must not point at one."""
    p = unetx_cli(*train_args(tmp_path, "--lr", "1e30", "--patches-per-image", "4"))
    line = one_clear_error(p, "stopped", "no checkpoint was written", "Lower --lr", code=1)
    assert "last.pt" not in line
    assert not (tmp_path / "out" / "last.pt").exists()


# ------------------------------------------------------------------------------------------ masks
def test_binary_masks_saved_as_jpeg_train(tmp_path):
    """JPEG ringing gives a binary mask dozens of grey values; they snap to the mask's two peaks (0 and 255)
    instead of being refused as 'too many grey values'."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        img, m = synthetic.cells(48, 48, rng)
        Image.fromarray(img).save(images / f"{name}.png")
        Image.fromarray(m).save(masks / f"{name}.jpg", quality=75)
    assert len(np.unique(np.asarray(Image.open(masks / "a.jpg")))) > 10  # the premise: JPEG made many values
    p = unetx_cli("train", "--images", images, "--masks", masks, "--out", tmp_path / "out", "--epochs", "1", *TINY)
    assert p.returncode == 0, p.stdout + p.stderr
    ckpt = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    assert ckpt["classes"]["kind"] == "binary" and ckpt["classes"]["values"] == [0, 255]


def test_jpeg_mask_peaks_and_lossless_values():
    m = np.zeros((1, 40, 40, 1), np.uint8)
    m[0, 10:30, 5:25] = 255
    noisy = m.astype(np.int16)
    noisy[0, 9:11, 5:25, 0] += np.array([3, -2], dtype=np.int16)[:, None]  # ringing at an edge, a few values
    noisy = np.clip(noisy, 0, 255).astype(np.uint8)
    assert udata.infer_class_table([noisy], lossy=[True]).values == [0, 255]
    with pytest.raises(udata.InputError, match=r"mask n\.png"):  # lossless: four values are four values
        udata.infer_class_table([noisy], names=["n.png"], lossy=[False])


def test_too_many_grey_values_names_the_mask_and_honours_classes(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    _write_pair(images, masks, "a", size=48)
    labels = (np.arange(48 * 48).reshape(48, 48) % 100).astype(np.uint8)  # a label map with 100 classes
    _write_pair(images, masks, "many", size=48, mask=labels)
    base = ["train", "--images", images, "--masks", masks, "--out", tmp_path / "out", "--epochs", "1", *TINY]
    line = one_clear_error(
        unetx_cli(*base, "--mask-mode", "labels"), "many.png", "100 distinct grey values", "--classes 100"
    )
    assert "a.png" not in line
    # --classes 300 is honoured: the 100 grey values (and a.png's 0 and 255) are classes of a 300-class table
    table = udata.infer_class_table(
        [read(masks / "a.png"), read(masks / "many.png")], "labels", num_classes=300, names=["a.png", "many.png"]
    )
    assert table.num_classes == 300
    with pytest.raises(udata.InputError, match=r"mask many.png has 100 distinct grey values, more than --classes 50"):
        udata.infer_class_table([read(masks / "many.png")], "labels", num_classes=50, names=["many.png"])


def read(path):
    return udata.read_image(path, mask=True)


# ------------------------------------------------------------------------------------------ predict / evaluate
def predict_args(run: Path, data: dict, tmp: Path, *extra) -> list:
    return [
        "predict",
        "--checkpoint",
        run / "best.pt",
        "--input",
        data["predict"] / "big.png",
        "--output",
        tmp / "pred",
        "--no-progress",
        *extra,
    ]


PREDICT_OPTIONS = {
    "--batch-size 0": (["--batch-size", "0"], ["--batch-size must be a positive number of tiles, got 0"]),
    "--batch-size -1": (["--batch-size", "-1"], ["--batch-size must be a positive number of tiles, got -1"]),
    "--overlap -1": (["--overlap", "-1"], ["--overlap must be >= 0 pixels", "got -1"]),
    "--tile 0": (["--tile", "0"], ["--tile must be a positive number of pixels, got 0"]),
    "--tile 16": (["--tile", "16"], ["--tile 16 is too small", "use --tile"]),
    "--device nonsense": (["--device", "gpu7"], ["--device 'gpu7' is not a device"]),
}


@pytest.mark.parametrize("case", list(PREDICT_OPTIONS))
def test_predict_option_is_refused_before_the_output_folder_exists(case, tmp_path, data, run_dir):
    run, _ = run_dir
    extra, expected = PREDICT_OPTIONS[case]
    one_clear_error(unetx_cli(*predict_args(run, data, tmp_path, *extra)), *expected)
    assert not (tmp_path / "pred").exists()


def test_evaluate_option_is_refused_before_anything_is_written(tmp_path, data, run_dir):
    run, _ = run_dir
    p = unetx_cli(
        "evaluate",
        "--checkpoint",
        run / "best.pt",
        "--images",
        data["val_images"],
        "--masks",
        data["val_masks"],
        "--csv",
        tmp_path / "e.csv",
        "--batch-size",
        "0",
        "--no-progress",
    )
    one_clear_error(p, "--batch-size must be a positive number of tiles, got 0")
    assert not (tmp_path / "e.csv").exists()


def test_predict_refuses_an_image_with_non_finite_pixels(tmp_path, run_dir):
    run, _ = run_dir
    x = np.random.default_rng(0).random((40, 40), dtype=np.float32)
    x[3, 4] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", x)
    p = unetx_cli(
        "predict",
        "--checkpoint",
        run / "best.pt",
        "--input",
        tmp_path / "nan.tif",
        "--output",
        tmp_path / "pred",
        "--no-progress",
    )
    one_clear_error(p, "nan.tif", "1 non-finite pixel value (NaN or Inf)", "row 3, column 4")
    assert not (tmp_path / "pred").exists()


# ------------------------------------------------------------------------------------------ demo
DEMO_OPTIONS = {
    "--epochs 0": (["--epochs", "0"], ["--epochs must be a positive integer, got 0"]),
    "--val-fraction 1.5": (["--val-fraction", "1.5"], ["--val-fraction must be in (0, 1), got 1.5"]),
    "--seed -3": (["--seed", "-3"], ["--seed must be in 0..2**32-1, got -3"]),
    "--device nonsense": (["--device", "gpu7"], ["--device 'gpu7' is not a device"]),
}


@pytest.mark.parametrize("case", list(DEMO_OPTIONS))
def test_demo_option_is_refused_before_anything_is_written(case, tmp_path):
    extra, expected = DEMO_OPTIONS[case]
    one_clear_error(unetx_cli("demo", "--quick", "--no-progress", "--out", tmp_path / "demo", *extra), *expected)
    assert not (tmp_path / "demo").exists()


# ------------------------------------------------------------------------------------------ checkpoints
def random_checkpoints(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        f = folder / f"junk{i}.pt"
        size = int(rng.integers(1, 4000))
        raw = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        if i % 3 == 1:  # a pickle opcode first, as torch's legacy format starts: reaches the unpickler
            raw = b"\x80\x02" + raw
        f.write_bytes(raw)
        files.append(f)
    return files


def test_every_random_file_is_one_checkpoint_error(tmp_path):
    """300 files of random bytes (23 of 300 once ended in IndexError: pop from empty list): each is one InputError
    naming the file."""
    for f in random_checkpoints(tmp_path, 300):
        with pytest.raises(udata.InputError) as e:
            checkpoint.load(f)
        assert str(f) in str(e.value) and "not a unetx checkpoint" in str(e.value)


def test_random_checkpoint_in_the_cli_is_one_line(tmp_path, data, run_dir):
    run, _ = run_dir
    culprit = None
    for f in random_checkpoints(tmp_path, 300):  # one that makes torch.load raise something besides its usual
        try:
            torch.load(f, weights_only=True)
        except (
            RuntimeError,
            EOFError,
            ValueError,
            OSError,
            AttributeError,
            TypeError,
            KeyError,
            ImportError,
            pickle.UnpicklingError,
        ):  # what checkpoint.load caught before
            continue
        except Exception:
            culprit = f
            break
    assert culprit is not None
    args = predict_args(run, data, tmp_path)
    args[2] = culprit
    one_clear_error(unetx_cli(*args), str(culprit), "not a unetx checkpoint")
    assert not (tmp_path / "pred").exists()


class Foreign:
    def __init__(self):
        self.payload = [1, 2, 3]


def test_pickled_object_message_has_no_torch_advice(tmp_path, data, run_dir):
    run, _ = run_dir
    torch.save({"model": Foreign()}, tmp_path / "obj.pt")
    args = predict_args(run, data, tmp_path)
    args[2] = tmp_path / "obj.pt"
    line = one_clear_error(
        unetx_cli(*args),
        "obj.pt",
        "not a unetx checkpoint",
        "Python objects (test_cli_errors.Foreign) that are not loaded, for safety",
        "written by `unetx train`",
    )
    assert "weights_only" not in line and "Weights only load failed" not in line and len(line) < 400


@pytest.mark.parametrize("damage", ["classes", "normalize", "config", "state_dict"])
def test_damaged_checkpoint_field_is_one_error(damage, tmp_path, data, run_dir):
    run, _ = run_dir
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt[damage] = {
        "classes": {"kind": "nonsense", "values": 3},
        "normalize": "sqrt",
        "config": [1, 2],
        "state_dict": 7,
    }[damage]
    torch.save(ckpt, tmp_path / "bad.pt")
    args = predict_args(run, data, tmp_path)
    args[2] = tmp_path / "bad.pt"
    one_clear_error(unetx_cli(*args), "bad.pt", "damaged unetx checkpoint")
    assert not (tmp_path / "pred").exists()


# ------------------------------------------------------------------------------------------ written files
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_permissions_of_the_umask(umask, tmp_path, data, run_dir):
    """Masks, overlays, checkpoints: readable by whoever the umask lets read them (they were 0600, private
    temporary files renamed into place)."""
    run, _ = run_dir
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "unetx",
        "predict",
        "--checkpoint",
        str(run / "best.pt"),
        "--input",
        str(data["predict"] / "big.png"),
        "--output",
        str(tmp_path / "pred"),
        "--tile",
        "64",
        "--no-progress",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=lambda: os.umask(umask))
    assert p.returncode == 0, p.stderr
    code = (
        "import os, torch; from unetx import checkpoint; "
        f"checkpoint.atomic_write({str(tmp_path / 'c.pt')!r}, lambda t: torch.save({{'a': 1}}, t))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env, preexec_fn=lambda: os.umask(umask))
    files = list((tmp_path / "pred").glob("*.png")) + [tmp_path / "c.pt"]
    assert len(files) >= 3
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, (f.name, oct(f.stat().st_mode))


def test_a_process_killed_while_writing_leaves_no_temporary_file(tmp_path):
    """SIGKILL in the middle of an atomic write (the write itself kills the process, so the kill lands there every
    time): the folder holds the old file only, no hidden .NAME.*.tmp."""
    (tmp_path / "mask.png").write_bytes(b"old")
    code = (
        "import os, signal; from unetx import checkpoint\n"
        "def write(tmp):\n"
        "    with open(tmp, 'wb') as f:\n"
        "        f.write(b'half of a new file'); f.flush()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"checkpoint.atomic_write({str(tmp_path / 'mask.png')!r}, write)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert sorted(f.name for f in tmp_path.iterdir()) == ["mask.png"]
    assert (tmp_path / "mask.png").read_bytes() == b"old"


@pytest.mark.parametrize("command", ["predict", "train", "demo"])
def test_output_folder_that_cannot_be_made_is_refused_first(command, tmp_path, data, run_dir):
    """An output folder inside a file: refused before anything is read (it was a NotADirectoryError traceback
    after the model had been loaded)."""
    run, _ = run_dir
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "out"
    if command == "predict":
        args = [
            "predict",
            "--checkpoint",
            run / "best.pt",
            "--input",
            data["predict"] / "big.png",
            "--output",
            target,
            "--no-progress",
        ]
    elif command == "train":
        args = train_args(tmp_path)
        args[args.index("--out") + 1] = target
    else:
        args = ["demo", "--quick", "--no-progress", "--out", target]
    one_clear_error(unetx_cli(*args), "cannot be made", "is a file", "choose another")

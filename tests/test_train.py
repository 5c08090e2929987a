"""Training: the Python API, determinism, resuming a SIGKILLed run, the NaN guard, multi-class colour masks, demo."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from unetx import checkpoint, synthetic
from unetx.app.cli import encode_mask
from unetx.app.data import read_image
from unetx.app.predict import predict_classes
from unetx.app.training import TrainConfig, Trainer, TrainingError, train, warn_if_bf16_emulated
from unetx.app.training.setup import amp_dtype, cpu_has_native_bf16, make_optimizer, restore_state

ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012"
TINY = dict(base_channels=4, depth=2, crop=32, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    root = tmp_path_factory.mktemp("cells")
    return synthetic.write_dataset(root, n_train=6, n_val=2, size=48, large=0, seed=1)


def config(cells, out, **kw) -> TrainConfig:
    return TrainConfig(
        images=str(cells["train_images"]),
        masks=str(cells["train_masks"]),
        val_images=str(cells["val_images"]),
        val_masks=str(cells["val_masks"]),
        out=str(out),
        **{**TINY, **kw},
    )


def state(path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def test_same_seed_same_weights_other_seed_other_weights(cells, tmp_path):
    a = train(config(cells, tmp_path / "a", epochs=1, seed=4))
    b = train(config(cells, tmp_path / "b", epochs=1, seed=4))
    c = train(config(cells, tmp_path / "c", epochs=1, seed=5))
    sa, sb, sc = (state(Path(r["last_checkpoint"])) for r in (a, b, c))
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.allclose(sa[k].float(), sc[k].float()) for k in sa)
    assert a["history"]["train_loss"] == pytest.approx(b["history"]["train_loss"], rel=1e-5)
    assert set(a["history"]) >= {"epoch", "train_loss", "val_loss", "val_dice", "val_dice_foreground", "lr"}


def _cli(args, **env_extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    return [sys.executable, "-m", "unetx", *map(str, args)], env


# Runs compared for exact equality must run the same kernels: each process measures its convolution choices afresh
# (UNETX_ALGO_CACHE=0 in tests), and on a busy machine two processes may pick different candidates for a shape,
# whose rounding differs (seen once in 2026-12-02's CI dry runs: a resumed run 1e-5 off the straight one).
SAME_KERNELS = {"UNETX_CONV_ALGO": "onednn"}


@pytest.mark.slow
def test_resume_after_sigkill_continues_exactly(cells, tmp_path):
    common = [
        "--images",
        cells["train_images"],
        "--masks",
        cells["train_masks"],
        "--val-images",
        cells["val_images"],
        "--val-masks",
        cells["val_masks"],
        "--epochs",
        "3",
        "--patches-per-image",
        "4",
        "--base-channels",
        "4",
        "--depth",
        "2",
        "--crop",
        "32",
        "--batch-size",
        "4",
        "--no-progress",
        "--seed",
        "11",
    ]
    killed = tmp_path / "killed"
    cmd, env = _cli(["train", "--out", killed, *common], **SAME_KERNELS)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (killed / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(killed / "last.pt", weights_only=True)["epoch"]  # atomic: a whole checkpoint, never half
    assert 1 <= done < 3, f"the run finished epoch {done} before it was killed; the test needs longer epochs"

    cmd, env = _cli(["train", "--resume", killed], **SAME_KERNELS)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"resuming after epoch {done}" in p.stdout

    straight = tmp_path / "straight"
    cmd, env = _cli(["train", "--out", straight, *common], **SAME_KERNELS)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr

    resumed, reference = state(killed / "last.pt"), state(straight / "last.pt")
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], rtol=1e-5, atol=1e-6, msg=k)
    with open(killed / "history.csv") as f1, open(straight / "history.csv") as f2:
        h1, h2 = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    assert [r["epoch"] for r in h1] == ["1", "2", "3"]
    assert [float(r["train_loss"]) for r in h1] == pytest.approx([float(r["train_loss"]) for r in h2], rel=1e-4)
    assert not list(killed.glob(".*.tmp"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(cells, tmp_path):
    out = tmp_path / "run"
    train(config(cells, out, epochs=1, patches_per_image=2))
    good = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.glob("*.pt")}
    trainer = Trainer.from_run_dir(out, epochs=2)
    for g in trainer.opt.param_groups:
        g["lr"] = 1e38  # the first step throws the weights to ~1e38: the next forward overflows
    with pytest.raises(TrainingError, match=r"loss became nan|loss became inf|not finite"):
        trainer.run()
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.glob("*.pt")} == good
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_colour_classes_weight_map_amp_channels_last(tmp_path):
    rng = np.random.default_rng(0)
    img_dir, msk_dir = tmp_path / "images", tmp_path / "masks"
    img_dir.mkdir(), msk_dir.mkdir()
    colours = np.array([(0, 0, 0), (255, 0, 0), (0, 255, 0)], np.uint8)
    for i in range(4):
        image, mask = synthetic.cells(40, 40, rng)
        classes = (mask > 0).astype(np.uint8)
        classes[:, 20:] *= 2  # cells on the right are a second class
        Image.fromarray(np.stack([image] * 3, -1)).save(img_dir / f"{i}.png")  # RGB images
        Image.fromarray(colours[classes]).save(msk_dir / f"{i}.png")
    r = train(
        images=str(img_dir),
        masks=str(msk_dir),
        out=str(tmp_path / "run"),
        val_fraction=0.25,
        epochs=1,
        weight_map=True,
        loss="ce",
        amp="on",
        channels_last=True,
        **TINY,
    )
    assert np.isfinite(r["history"]["train_loss"]).all()
    model, ckpt = checkpoint.load_model(r["best_checkpoint"])
    assert ckpt["classes"]["kind"] == "colour" and len(ckpt["classes"]["values"]) == 3
    assert model.config["in_channels"] == 3 and model.config["out_channels"] == 3
    table = checkpoint.class_table(ckpt)
    classes, _ = predict_classes(model, read_image(img_dir / "0.png")[0], tile=64, overlap=8)
    written = encode_mask(classes, table, "original")
    assert written.shape == (40, 40, 3)
    assert {tuple(c) for c in written.reshape(-1, 3)} <= {tuple(c) for c in colours.tolist()}


def _cpuinfo_native_bf16() -> bool:
    """The kernel's own word on the CPU's flags: an oracle independent of torch's cpuinfo checks."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo to check the CPU's bfloat16 flags against")
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def test_bfloat16_autocast_warning_follows_the_cpu():
    """--amp on the CPU warns exactly where bfloat16 is emulated (no AVX512-BF16 / AMX), naming the fix."""
    native = _cpuinfo_native_bf16()
    assert cpu_has_native_bf16() == native
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_bf16_emulated(torch.device("cpu"))
    assert len(caught) == (0 if native else 1)
    assert all("--amp off" in str(w.message) for w in caught)


def test_amp_auto_is_bfloat16_exactly_on_cpus_with_native_bfloat16():
    cpu = torch.device("cpu")
    auto = amp_dtype(TrainConfig(images="i", masks="m", amp="auto"), cpu)
    assert auto == (torch.bfloat16 if _cpuinfo_native_bf16() else None)
    assert amp_dtype(TrainConfig(images="i", masks="m", amp="off"), cpu) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert amp_dtype(TrainConfig(images="i", masks="m", amp="on"), cpu) == torch.bfloat16


def test_optimizer_is_fused_adam_and_stays_fused_on_resume():
    """unetx train's Adam is torch's fused one on the CPU, and a checkpoint saved by an unfused Adam (before it was
    fused) resumes fused: load_state_dict alone would take the saved group's fused=None. The fused step equals the
    unfused one (same algorithm) to float32 rounding."""
    cfg = TrainConfig(images="i", masks="m", lr=1e-3, weight_decay=1e-4)
    torch.manual_seed(0)
    w = [torch.randn(7, 5, requires_grad=True), torch.randn(3, requires_grad=True)]
    w_plain = [t.detach().clone().requires_grad_() for t in w]
    opt, plain = make_optimizer(cfg, w), torch.optim.Adam(w_plain, lr=cfg.lr, weight_decay=cfg.weight_decay)
    assert opt.param_groups[0]["fused"] is True
    for _ in range(3):
        for a, b in zip(w, w_plain):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        plain.step()
    for a, b in zip(w, w_plain):
        torch.testing.assert_close(a, b)
    ckpt = {"optimizer": plain.state_dict(), "epoch": 3}
    assert ckpt["optimizer"]["param_groups"][0]["fused"] is None
    restore_state(ckpt, cfg, opt, None, None, {"epoch": -1})
    assert opt.param_groups[0]["fused"] is True
    opt.step()  # the loaded state steps fused


def test_demo_quick_runs_end_to_end(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, "-m", "unetx", "demo", "--quick", "--out", tmp_path / "demo", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"held-out Dice \(foreground\) \d\.\d{4}", p.stdout), p.stdout
    assert (tmp_path / "demo" / "run" / "curves.png").is_file()
    assert list((tmp_path / "demo" / "predictions").glob("*_overlay.png"))


@pytest.mark.slow
def test_demo_reaches_dice_090_on_synthetic_cells(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "unetx", "demo", "--out", tmp_path / "demo", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    dice = float(re.search(r"held-out Dice \(foreground\) (\d\.\d+)", p.stdout).group(1))
    assert dice >= 0.9, p.stdout


@pytest.mark.slow
def test_demo_on_isbi_folder(tmp_path):
    if not (ISBI / "train" / "images").is_dir():
        pytest.skip(f"ISBI 2012 data not found at {ISBI}")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "unetx",
            "demo",
            "--quick",
            "--data",
            ISBI,
            "--foreground",
            "dark",
            "--out",
            tmp_path / "demo",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "25 training / 5 validation images" in p.stdout
    assert re.search(r"held-out Dice \(foreground\) \d\.\d{4}", p.stdout)
    assert list((tmp_path / "demo" / "predictions").glob("*_overlay.png"))

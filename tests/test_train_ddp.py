"""`torchrun --nproc-per-node 2 -m unetx train` on the CPU (gloo): the real launcher, two processes.

With --sync-bn and a per-pixel-mean loss, two processes with batch 2 each must train the same weights as one process
with batch 4: the DistributedSampler gives each rank every other patch of the same shuffled order, gradients are
averaged, and batch statistics are computed over both halves. Validation is split across the ranks and summed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from unetx import synthetic
from unetx.app.training import train


@pytest.mark.slow
def test_torchrun_two_processes_equals_one_process_with_the_whole_batch(tmp_path):
    d = synthetic.write_dataset(tmp_path / "data", n_train=6, n_val=3, size=48, large=0, seed=2)
    # float32 (--amp off): the comparison is exact up to float32 summation order, which bf16 autocast would swamp
    opts = dict(base_channels=4, depth=2, crop=32, epochs=2, patches_per_image=2, loss="ce", seed=3, lr=3e-3, amp="off")
    args = [
        "--images",
        d["train_images"],
        "--masks",
        d["train_masks"],
        "--val-images",
        d["val_images"],
        "--val-masks",
        d["val_masks"],
        "--no-progress",
        "--sync-bn",
        "--batch-size",
        "2",
    ]
    for k, v in opts.items():
        args += ["--" + k.replace("_", "-"), v]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "unetx",
            "train",
            "--out",
            tmp_path / "ddp",
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "x 2 processes" in p.stdout and p.stdout.count("unetx train: done") == 1  # rank 0 alone reports

    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert ddp["world_size"] == 2 and ddp["epoch"] == 2
    assert ddp["history"]["steps"] == [3.0, 3.0]  # 12 patches / 2 ranks / batch 2

    single = train(
        images=str(d["train_images"]),
        masks=str(d["train_masks"]),
        val_images=str(d["val_images"]),
        val_masks=str(d["val_masks"]),
        out=str(tmp_path / "single"),
        batch_size=4,
        progress=False,
        **opts,
    )
    ref = torch.load(single["last_checkpoint"], weights_only=True)
    for k, v in ref["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][k].float(), v.float(), rtol=2e-4, atol=2e-5, msg=k)
    for key in ("train_loss", "val_loss", "val_dice_foreground", "val_iou_background"):
        assert ddp["history"][key] == pytest.approx(ref["history"][key], rel=1e-4, abs=1e-6), key

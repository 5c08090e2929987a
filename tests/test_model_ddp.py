"""Real DistributedDataParallel: torchrun, 2 CPU processes, gloo. With sync_bn=True the 2-process run must equal
one process training on the whole batch (batch statistics over both halves, as nn.SyncBatchNorm)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import unetx

WORKER = Path(__file__).with_name("ddp_model_worker.py")


def run_torchrun(tmp_path, mode):
    out = tmp_path / f"{mode}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(WORKER),
            str(out),
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def single_process_reference():
    torch.manual_seed(0)
    model = unetx.UNet(1, 2, base_channels=4, depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 1, 16, 16, generator=g)
        t = torch.randn(4, 2, 16, 16, generator=g)
        loss = (model(x) - t).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


@pytest.mark.slow
def test_ddp_sync_bn_equals_single_process_full_batch(tmp_path):
    ddp_state = run_torchrun(tmp_path, "sync")
    ref_state = single_process_reference()
    for k, v in ref_state.items():
        torch.testing.assert_close(ddp_state[k].float(), v.float(), rtol=2e-4, atol=2e-5, msg=k)


@pytest.mark.slow
def test_ddp_without_sync_bn_trains_and_differs_from_full_batch(tmp_path):
    ddp_state = run_torchrun(tmp_path, "local")
    ref_state = single_process_reference()
    # per-rank batch statistics: the running means differ from full-batch ones (so the sync test can fail)
    diffs = [(ddp_state[k] - v).abs().max().item() for k, v in ref_state.items() if k.endswith("running_mean")]
    assert max(diffs) > 1e-4

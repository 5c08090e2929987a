"""Run by tests/test_model_ddp.py under torchrun (2 processes, gloo): a few SGD steps of unetx.UNet under
DistributedDataParallel, each rank on its half of one batch; rank 0 saves the resulting state_dict."""

import os
import sys

import torch
import torch.distributed as dist
import unetx
from torch.nn.parallel import DistributedDataParallel as DDP


def main(out_path: str, sync_bn: bool) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = unetx.UNet(1, 2, base_channels=4, depth=2, sync_bn=sync_bn)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 1, 16, 16, generator=g)
        t = torch.randn(4, 2, 16, 16, generator=g)
        lo, hi = rank * 4 // world, (rank + 1) * 4 // world
        loss = (ddp(x[lo:hi]) - t[lo:hi]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # every rank must hold the same weights
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], f) for f in gathered), "ranks diverged"
    if rank == 0:
        torch.save(model.state_dict(), out_path)
    # Both ranks are done (the barrier), then leave without tearing gloo down: its teardown (destroy_process_group,
    # and its worker threads at interpreter exit) aborted a rank twice in CI dry runs, the second time after a
    # barrier had been added before destroy_process_group ("terminate called without an active exception", SIGABRT
    # in rank 1; pytorch/pytorch#179291 describes the exit-time case). This worker tests DDP's numerics, not gloo's
    # teardown; os._exit skips both once the output file is closed and the streams flushed.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "sync")

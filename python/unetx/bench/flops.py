"""The work in one step and the device's matrix-multiply rate: a step's achieved GFLOP/s beside what a large GEMM
reaches on the same machine in the same dtype, so that a ratio near the convolutions' ceiling reads as such."""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..nn import reference
from .workloads import Workload


def step_flops(w: Workload, task: str) -> int:
    """Floating-point operations of one step of w, as torch.utils.flop_counter counts them on the stock twin: every
    convolution (2 per multiply-add), forward and, for "train", the gradients the step computes (the first layer
    has no input gradient). Counted as direct convolution, so unetx's Winograd layers are credited with more
    multiplications than they do; BatchNorm, ReLU, pooling, the loss and Adam are not counted. On the meta device:
    no memory, no time."""
    model = reference.UNet(**w.config).to("meta").train(task == "train")
    x = torch.empty(w.batch, w.config["in_channels"], w.size, w.size, device="meta")
    with FlopCounterMode(display=False) as counter:
        if task == "train":
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops()


def gemm_rate(device: str, dtype: str | None, n: int = 2048, budget_s: float = 1.0) -> dict:
    """GFLOP/s of an n x n x n torch.mm in dtype (None: float32) on device, the median of up to 5 calls after a
    warm-up one (fewer where a call is slow, e.g. bfloat16 emulated on an AVX2 CPU): the rate of the GEMM library
    torch calls there (oneDNN or MKL on the CPU, cuBLAS on CUDA), the practical ceiling of a step made of
    convolutions."""
    dt = getattr(torch, dtype) if dtype else torch.float32
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dev, dt) for _ in range(2))

    def once() -> float:
        t0 = time.perf_counter()
        torch.mm(a, b)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    first = once()
    times = [once() for _ in range(max(1, min(5, int(budget_s / max(first, 1e-9)))))]
    return dict(dtype=str(dt).removeprefix("torch."), n=n, gflops=2 * n**3 / statistics.median(times) / 1e9)

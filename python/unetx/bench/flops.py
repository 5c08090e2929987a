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


def _mm_rate(dev: torch.device, dt: torch.dtype, n: int, budget_s: float) -> tuple[int, float]:
    """(size, GFLOP/s) of an n x n x n torch.mm in dt: the median of up to 5 calls after a warm-up one. A dtype the
    device only emulates (bfloat16 on an AVX2 CPU: about 1 GFLOP/s, some 18 s for one 2048-cube call) is timed at
    n / 4 where a second call there projects a full-size call past 4x the budget."""

    def operands(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return tuple(torch.randn(m, m, generator=g).to(dev, dt) for _ in range(2))

    def once(a: torch.Tensor, b: torch.Tensor) -> float:
        t0 = time.perf_counter()
        torch.mm(a, b)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    m, ab = n // 4, operands(n // 4)
    once(*ab)  # one-off costs (a CUDA context's GEMM handle, oneDNN's first JIT) before the call that projects
    first = once(*ab)
    if first * 64 <= 4 * budget_s:
        m, ab = n, operands(n)
        first = once(*ab)
    times = [once(*ab) for _ in range(max(1, min(5, int(budget_s / max(first, 1e-9)))))]
    return m, 2 * m**3 / statistics.median(times) / 1e9


def gemm_rate(device: str, dtype: str | None, n: int = 2048, budget_s: float = 1.0) -> dict:
    """GFLOP/s of an n x n x n torch.mm in dtype (None: float32) on device: the rate of the GEMM library torch calls
    there (oneDNN or MKL on the CPU, cuBLAS on CUDA), the practical ceiling of a step made of convolutions. On a CPU
    where float32 is faster than dtype (bfloat16 or float16 emulated: no AVX512-BF16/AMX), the ceiling is float32's:
    a low-precision step computes in float32 there (unetx's Winograd does), so the dict gives float32's rate, with
    dtype's own under "emulated" (its size and rate)."""
    dt = getattr(torch, dtype) if dtype else torch.float32
    dev = torch.device(device)
    m, rate = _mm_rate(dev, dt, n, budget_s)
    out = dict(dtype=str(dt).removeprefix("torch."), n=m, gflops=rate)
    if dev.type == "cpu" and dt != torch.float32:
        m32, rate32 = _mm_rate(dev, torch.float32, n, budget_s)
        if rate32 > rate:
            out = dict(dtype="float32", n=m32, gflops=rate32, emulated=out)
    return out

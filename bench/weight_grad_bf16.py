"""bf16 weight gradient: oneDNN's (channels-last and planar operands) against 3x3 = 9 bf16 GEMMs over shifted pixel
rows (unetx's GEMM formulation, csrc/cpu/conv_weight_grad.cpp, without its edge corrections: a lower bound on its
time), at CPU-S's layer shapes (batch 4). Decides whether a bf16 GEMM candidate is worth adding to the weight
gradient's measured choice (BENCHMARKS.md, "CPU bfloat16").

    python bench/weight_grad_bf16.py [--threads 2]
"""

import argparse
import statistics
import time

import torch
from unetx.allocator import keep_freed_memory

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=2)
torch.set_num_threads(parser.parse_args().threads)
keep_freed_memory()  # as `unetx bench` and the commands run (unetx/allocator.py)


def med(f, r=5):
    f()
    ts = []
    for _ in range(r):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


for c, s in [(32, 256), (64, 128), (128, 64), (256, 32), (512, 16)]:
    n, co = 4, c
    a = torch.randn(n, c, s, s).bfloat16().contiguous(memory_format=torch.channels_last)
    g = torch.randn(n, co, s, s).bfloat16().contiguous(memory_format=torch.channels_last)
    w = torch.randn(co, c, 3, 3).bfloat16().contiguous(memory_format=torch.channels_last)
    ap, gp, wp = a.contiguous(), g.contiguous(), w.contiguous()

    def cl(g=g, a=a, w=w):
        return torch.ops.aten.convolution_backward(
            g, a, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
        )

    def pl(g=gp, a=ap, w=wp):
        return torch.ops.aten.convolution_backward(
            g, a, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
        )

    A = a.permute(0, 2, 3, 1).reshape(-1, c)
    G = g.permute(0, 2, 3, 1).reshape(-1, co)
    P = A.shape[0]
    W = s

    def gemm():
        out = []
        for dh in (-1, 0, 1):
            for dw in (-1, 0, 1):
                sft = dh * W + dw
                lo = max(0, -sft)
                hi = min(P, P - sft)
                out.append(torch.mm(G[lo:hi].t(), A[lo + sft : hi + sft]))
        return out

    print(
        f"C={c} {s}x{s}: onednn CL {med(cl) * 1e3:.1f} ms, onednn planar {med(pl) * 1e3:.1f} ms, "
        f"9 bf16 mm {med(gemm) * 1e3:.1f} ms",
        flush=True,
    )

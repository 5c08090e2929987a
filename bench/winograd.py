"""unetx's Winograd 3x3 convolutions (csrc/cpu/winograd.cpp, F(4x4,3x3) and F(2x2,3x3)) against torch's
channels-last convolution (oneDNN), same process, for every 3x3 convolution shape of CPU-S (UNet 1->2, base 32,
depth 4, batch 4, 256x256): forward, input gradient, weight gradient, medians in ms. Then (--accuracy) each one's
max-abs error against a float64 reference, as a multiple of stock float32's own error.

    python bench/winograd.py --threads 2              # timings (run under the CPU lock), then the accuracy table
    python bench/winograd.py --quick                  # a smoke test on tiny shapes (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import unetx  # noqa: F401  (registers torch.ops.unetx)
from unetx.allocator import keep_freed_memory

aten = torch.ops.aten
ops = torch.ops.unetx
CL = torch.channels_last
CONV = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, transposed, output_padding, groups
# (N, C_in, H, W, C_out): the 3x3 convolutions of CPU-S, encoder then decoder (a decoder layer's input is the
# concatenation of the skip and the upsampled tensor)
SHAPES = [
    (4, 1, 256, 256, 32),
    (4, 32, 256, 256, 32),
    (4, 32, 128, 128, 64),
    (4, 64, 128, 128, 64),
    (4, 64, 64, 64, 128),
    (4, 128, 64, 64, 128),
    (4, 128, 32, 32, 256),
    (4, 256, 32, 32, 256),
    (4, 256, 16, 16, 512),
    (4, 512, 16, 16, 512),
    (4, 512, 32, 32, 256),
    (4, 256, 64, 64, 128),
    (4, 128, 128, 128, 64),
    (4, 64, 256, 256, 32),
]
QUICK_SHAPES = [(2, 3, 9, 7, 5), (1, 16, 12, 12, 16)]
# accuracy: (N, H, W) and the channel counts tried (C_in = C_out)
ACC_SIZE = (2, 32, 32)
ACC_CHANNELS = [1, 3, 17, 32, 64, 256]


def median_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
        return " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if x in flags)
    except (OSError, StopIteration):
        return "?"


def timing_table(shapes, reps: int) -> None:
    """Per shape and op: stock, both tiles, and F(4x4) on one image of one tile (4 x 4 pixels): what a call costs
    with almost no tiles, its per-call weight-sized work (the forward's and input gradient's weight transform, the
    weight gradient's inverse one). Medians taken apart: the columns do not add up exactly on a noisy machine."""
    print("| layer (in->out @ size) | op | stock CL | F(4x4) | F(2x2) | best speed-up | F(4x4), one 4x4 tile |")
    print("|---|---|---|---|---|---|---|")
    totals = {"stock": 0.0, "best": 0.0}
    for n, c, h, w, co in shapes:
        x = torch.randn(n, c, h, w).contiguous(memory_format=CL)
        g = torch.randn(n, co, h, w).contiguous(memory_format=CL)
        x1, g1 = (t[:1, :, :4, :4].contiguous(memory_format=CL) for t in (x, g))
        wt = torch.randn(co, c, 3, 3)
        wcl = wt.contiguous(memory_format=CL)
        cases = {
            "forward": (
                lambda: aten.convolution(x, wcl, None, *CONV),
                lambda m, x, g: ops.winograd_conv3x3(x, wt, m),
            ),
            "input grad": (
                lambda: aten.convolution_backward(g, x, wcl, None, *CONV, [True, False, False])[0],
                lambda m, x, g: ops.winograd_conv3x3_input_grad(g, wt, m),
            ),
            "weight grad": (
                lambda: aten.convolution_backward(g, x, wcl, None, *CONV, [False, True, False])[1],
                lambda m, x, g: ops.winograd_conv3x3_weight_grad(g, x, m),
            ),
        }
        for name, (stock, wino) in cases.items():
            t = [median_ms(stock, reps), median_ms(lambda: wino(4, x, g), reps), median_ms(lambda: wino(2, x, g), reps)]
            one_tile = median_ms(lambda: wino(4, x1, g1), reps)
            best = min(t)
            totals["stock"] += t[0]
            totals["best"] += best
            print(
                f"| {c}->{co} @{h} | {name} | {t[0]:.1f} | {t[1]:.1f} | {t[2]:.1f} | {t[0] / best:.2f}x "
                f"| {one_tile:.2f} |",
                flush=True,
            )
    print(
        f"\nsum over shapes and ops: stock {totals['stock']:.0f} ms, best of the three {totals['best']:.0f} ms "
        f"({totals['stock'] / totals['best']:.2f}x)"
    )


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item()


def accuracy_table(size, channels, seeds: int = 3) -> None:
    """Max-abs error against float64 (inputs and weights N(0, 1), weight scaled by 1/sqrt(9 C_in) as Kaiming),
    worst over seeds; the ratio is the kernel's error over stock float32's (oneDNN channels-last)."""
    n, h, w = size
    print("\n| C_in = C_out | op | stock f32 error | F(4x4) error (ratio) | F(2x2) error (ratio) |")
    print("|---|---|---|---|---|")
    for c in channels:
        errs = {}
        for seed in range(seeds):
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=CL)
            g = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=CL)
            wt = torch.randn(c, c, 3, 3, generator=gen) / (9 * c) ** 0.5
            xd, wd = x.double().requires_grad_(), wt.double().requires_grad_()
            yd = F.conv2d(xd, wd, padding=1)
            yd.backward(g.double())
            refs = {"forward": yd.detach(), "input grad": xd.grad, "weight grad": wd.grad}
            wcl = wt.contiguous(memory_format=CL)
            stock = {
                "forward": aten.convolution(x, wcl, None, *CONV),
                "input grad": aten.convolution_backward(g, x, wcl, None, *CONV, [True, False, False])[0],
                "weight grad": aten.convolution_backward(g, x, wcl, None, *CONV, [False, True, False])[1],
            }
            for name, ref in refs.items():
                e = [max_err(stock[name], ref)]
                for m in (4, 2):
                    out = {
                        "forward": ops.winograd_conv3x3(x, wt, m),
                        "input grad": ops.winograd_conv3x3_input_grad(g, wt, m),
                        "weight grad": ops.winograd_conv3x3_weight_grad(g, x, m),
                    }[name]
                    e.append(max_err(out, ref))
                old = errs.get(name, [0.0, 0.0, 0.0])
                errs[name] = [max(a, b) for a, b in zip(old, e)]
        for name, (s, f4, f2) in errs.items():
            print(f"| {c} | {name} | {s:.2e} | {f4:.2e} ({f4 / s:.1f}x) | {f2:.2e} ({f2 / s:.1f}x) |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one rep: a smoke test")
    ap.add_argument("--no-accuracy", action="store_true", help="timings only")
    ap.add_argument("--no-timing", action="store_true", help="the accuracy table only")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `unetx bench` and the commands run (unetx/allocator.py)
    reps = 1 if args.quick else args.reps
    print(
        f"{platform.processor() or platform.machine()} ({cpu_flags()}), {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, medians of {reps}, ms\n"
    )
    if not args.no_timing:
        timing_table(QUICK_SHAPES if args.quick else SHAPES, reps)
    if not args.no_accuracy:
        accuracy_table(
            (1, 9, 7) if args.quick else ACC_SIZE, [3, 16] if args.quick else ACC_CHANNELS, seeds=1 if args.quick else 3
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The weight gradient of each 3x3 convolution shape in a CPU-S training step, four ways, same process:
unetx's channels-last kernel (csrc/cpu/conv_weight_grad.cpp, through the op's backward with nothing else to do),
oneDNN with channels-last operands, oneDNN with planar operands that are already planar (conversion not counted),
and, for scale, the forward convolution in channels-last. Medians in ms; the relative error is unetx's against
oneDNN's channels-last result.

    python bench/weight_grad.py --threads 2
    python bench/weight_grad.py --quick          # two small shapes, one repetition: seconds (smoke test)
"""

from __future__ import annotations

import argparse
import sys

import torch
from unetx import bench  # also registers torch.ops.unetx
from unetx.allocator import keep_freed_memory

aten = torch.ops.aten
CL = torch.channels_last
# (N, C_in, H, W, C_out): the 3x3 convolutions of CPU-S (UNet 1->2, base 32, depth 4, batch 4, 256x256)
SHAPES = [
    (4, 32, 256, 256, 32),
    (4, 64, 256, 256, 32),
    (4, 32, 128, 128, 64),
    (4, 64, 128, 128, 64),
    (4, 128, 128, 128, 64),
    (4, 64, 64, 64, 128),
    (4, 128, 64, 64, 128),
    (4, 256, 64, 64, 128),
    (4, 128, 32, 32, 256),
    (4, 256, 32, 32, 256),
    (4, 512, 32, 32, 256),
    (4, 256, 16, 16, 512),
    (4, 512, 16, 16, 512),
]
QUICK_SHAPES = [(2, 16, 16, 16, 16), (2, 32, 8, 8, 16)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="two small shapes, one repetition: checks the script runs")
    args = ap.parse_args(argv)
    shapes = SHAPES
    if args.quick:
        shapes, args.reps = QUICK_SHAPES, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `unetx bench` and the commands run (unetx/allocator.py)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, medians of {args.reps}\n")
    print(
        "| input [N, C, H, W] | C_out | unetx (channels_last) | oneDNN channels_last | oneDNN planar | "
        "forward channels_last | rel. error |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, c, h, w, co in shapes:
        a = torch.randn(n, c, h, w).contiguous(memory_format=CL)
        g = torch.randn(n, co, h, w).contiguous(memory_format=CL)
        wt = torch.randn(co, c, 3, 3).contiguous(memory_format=CL)
        ap_, gp, wp = a.contiguous(), g.contiguous(), wt.contiguous()
        none = g.new_empty(0)
        conv = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        ours = lambda: torch.ops.unetx.conv_bn_relu_backward(
            g,
            None,
            None,
            a,
            None,
            None,
            False,
            None,
            "none",
            wt,
            False,
            False,
            none,
            none,
            False,
            [False, False, True, False],
        )[4]
        cl = lambda: aten.convolution_backward(g, a, wt, None, *conv, [False, True, False])[1]
        pl = lambda: aten.convolution_backward(gp, ap_, wp, None, *conv, [False, True, False])[1]
        fw = lambda: aten.convolution(a, wt, None, *conv)
        ref = cl()
        err = ((ours() - ref).abs().max() / ref.abs().max()).item()
        t = [bench.median_ms(f, args.reps) for f in (ours, cl, pl, fw)]
        print(f"| {[n, c, h, w]} | {co} | {t[0]:.1f} | {t[1]:.1f} | {t[2]:.1f} | {t[3]:.1f} | {err:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

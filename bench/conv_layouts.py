"""Where the convolution time of a unetx training step goes, per layout: each convolution of the step (recorded
from unetx.UNet with unetx.bench.ConvRecorder) timed as forward, backward-data and backward-weight in NCHW and in
channels_last, then the whole step's convolutions replayed in four layout plans. The fused layers write their
input stage (recomputed in backward) and their folded output gradient themselves, so the layout each of the
three convolutions sees is theirs to choose at no extra pass; this measures what each choice would cost.

    python bench/conv_layouts.py --threads 2                  # CPU-S
    python bench/conv_layouts.py --threads 2 --per-conv       # and one line per convolution
    python bench/conv_layouts.py --quick                      # a tiny network, one round: seconds (smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import torch
from unetx import bench
from unetx.allocator import keep_freed_memory

aten = torch.ops.aten
CL, NCHW = torch.channels_last, torch.contiguous_format


def _geometry(r: dict) -> tuple[list[int], list[int]]:
    k = r["weight"].shape[-1]
    return ([k, k], [0, 0]) if r["transposed"] else ([1, 1], [k // 2, k // 2])


def per_conv(rec: bench.ConvRecorder, reps: int) -> list[str]:
    lines = [
        "| input | weight | layout | forward ms | backward-data ms | backward-weight ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rec.backward:
        st, pd = _geometry(r)
        tr = r["transposed"]
        for fmt, name in ((NCHW, "NCHW"), (CL, "channels_last")):
            a = torch.randn(r["shape"]).contiguous(memory_format=fmt)
            g = torch.randn(r["grad_shape"]).contiguous(memory_format=fmt)
            w = r["weight"].clone().contiguous(memory_format=fmt)
            f = bench.median_ms(lambda: aten.convolution(a, w, None, st, pd, [1, 1], tr, [0, 0], 1), reps)
            d = (
                bench.median_ms(
                    lambda: aten.convolution_backward(
                        g, a, w, None, st, pd, [1, 1], tr, [0, 0], 1, [True, False, False]
                    ),
                    reps,
                )
                if r["mask"][0]
                else None
            )
            wg = bench.median_ms(
                lambda: aten.convolution_backward(g, a, w, None, st, pd, [1, 1], tr, [0, 0], 1, [False, True, False]),
                reps,
            )
            lines.append(
                f"| {list(r['shape'])} | {list(r['weight'].shape)} | {name} | {f:.1f} | "
                f"{'-' if d is None else f'{d:.1f}'} | {wg:.1f} |"
            )
    return lines


def plan(rec: bench.ConvRecorder, fwd: torch.memory_format, data: torch.memory_format, weight: torch.memory_format):
    """All the step's convolutions: forward in `fwd`, input gradient in `data`, weight gradient in `weight`."""
    fw, bw = [], []
    for r in rec.forward:
        st, pd = _geometry(r)
        fw.append(
            (
                torch.randn(r["shape"]).contiguous(memory_format=fwd),
                r["weight"].clone().contiguous(memory_format=fwd),
                r["bias"],
                st,
                pd,
                r["transposed"],
            )
        )
    for r in reversed(rec.backward):
        st, pd = _geometry(r)
        out_ch = r["weight"].shape[1] if r["transposed"] else r["weight"].shape[0]
        g, a, w = torch.randn(r["grad_shape"]), torch.randn(r["shape"]), r["weight"].clone()
        bw.append(
            dict(
                g_d=g.contiguous(memory_format=data),
                g_w=g.contiguous(memory_format=weight),
                a_d=a.contiguous(memory_format=data),
                a_w=a.contiguous(memory_format=weight),
                w_d=w.contiguous(memory_format=data),
                w_w=w.contiguous(memory_format=weight),
                bias=[out_ch] if r["has_bias"] else None,
                st=st,
                pd=pd,
                tr=r["transposed"],
                mask=r["mask"],
            )
        )
    split = data != weight

    def run() -> None:
        with torch.no_grad():
            for a, w, b, st, pd, tr in fw:
                aten.convolution(a, w, b, st, pd, [1, 1], tr, [0, 0], 1)
            for c in bw:
                common = (c["st"], c["pd"], [1, 1], c["tr"], [0, 0], 1)
                if not split:
                    aten.convolution_backward(c["g_d"], c["a_d"], c["w_d"], c["bias"], *common, c["mask"])
                    continue
                if c["mask"][0]:
                    aten.convolution_backward(c["g_d"], c["a_d"], c["w_d"], None, *common, [True, False, False])
                aten.convolution_backward(
                    c["g_w"], c["a_w"], c["w_w"], c["bias"], *common, [False, c["mask"][1], c["mask"][2]]
                )

    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="CPU-S", choices=sorted(bench.WORKLOADS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-conv", action="store_true", help="also time each convolution alone")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a tiny network (base 4, depth 2, 32x32), one round, per-convolution lines too: checks the "
        "script runs, measures nothing",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `unetx bench` and the commands run (unetx/allocator.py)
    w = bench.WORKLOADS[args.workload]
    if args.quick:
        config = dict(w.config, base_channels=4, depth=2)
        w = dataclasses.replace(w, name="quick", config=config, batch=2, size=32)
        args.rounds, args.per_conv, args.workload = 1, True, "quick"
    if w.device != "cpu":
        raise SystemExit(f"conv_layouts: {args.workload} is a {w.device} workload; this script times CPU layouts")
    state, x, target = bench._inputs(w)
    case = bench.Case(w, bench.Form("unetx", "channels_last"), "train", state, x, target)
    rec = bench.record_convs(case)
    del case
    if args.per_conv:
        print("\n".join(per_conv(rec, args.rounds)) + "\n", flush=True)
    plans = {
        "all NCHW": (NCHW, NCHW, NCHW),
        "all channels_last": (CL, CL, CL),
        "forward + input grad channels_last, weight grad NCHW": (CL, CL, NCHW),
        "forward channels_last, backward NCHW": (CL, NCHW, NCHW),
    }
    samples, _ = bench.time_interleaved({k: plan(rec, *v) for k, v in plans.items()}, args.rounds)
    print(
        f"The {len(rec.forward)} forward and {len(rec.backward)} backward convolutions of one {args.workload} "
        f"training step, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds:\n"
    )
    print("| layout plan | median s | min s |\n|---|---|---|")
    for k, v in samples.items():
        print(f"| {k} | {statistics.median(v):.2f} | {min(v):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

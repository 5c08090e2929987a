"""unetx's memory-bound CPU passes in bfloat16 (and float16) against float32, at CPU-S sizes.

A pass that only reads and writes activations moves half the bytes in a 2-byte dtype, so its time in bfloat16 should
be at most ~0.6x its float32 time on any CPU (issue 12): a machine-independent figure. Each row is one pass at one
U-Net level of CPU-S (batch 4; level i: 32 * 2**i channels at (256 / 2**i)^2 pixels), channels_last by default:

- the standalone ops (bn_relu, bn_relu_pool, avg_pool2x2, upsample_concat, each forward and backward), timed
  directly;
- the passes inside conv_bn_relu's forward and backward (unetx::input_stage, batch_stats, fold_output_grad,
  activation_backward, upsample_backward, to_planar), the mean time per call from torch.profiler's record_function
  events in a round of three training layers forward+backward (normalised input with its batch mean; pooled;
  concatenated with a nearest-upsampled x2). The weight gradient is forced to one candidate for both dtypes
  (--weight-grad, default onednn_planar, whose to_planar pass is then in both), so that the same passes run in both.

Each round times float32 and the low precision back to back (order alternating); a row gives the median times and
the median of the rounds' ratios, so that a slow stretch of a shared machine does not land on one side of a ratio.
Each level also times ATen's clone of the level's activation ("floor: ATen copy"), the same bytes read and written
with no arithmetic: the ratio the memory system gives at that size, which no pass of that size can be expected to
beat (a small tensor's time is partly per-call and latency cost, which a 2-byte dtype does not halve). It is shown
beside each level's summary and not counted among the passes.
--cache cold (default) has every timed call read its inputs from memory (see Evict), as in a training step; --cache
hot repeats calls on inputs that stay in cache where they fit.

    python bench/bf16_passes.py [--threads 2] [--dtype bfloat16] [--layout channels_last] [--cache cold|hot]
                                [--rounds 9] [--json out.json]
    python bench/bf16_passes.py --quick        # tiny sizes, one round: a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import unetx
from unetx.allocator import keep_freed_memory
from unetx.ops import algo_choice


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = set(line.split(":", 1)[1].split())
                    keep = ["avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"]
                    return " ".join(k for k in keep if k in fl)
    except OSError:
        pass
    return platform.machine()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


class Evict:
    """Writes a buffer of twice the last-level cache (or 64 MiB) before a timed call, so that the call reads its
    inputs from memory: the regime of a pass in a training step, where a layer's convolutions run between it and
    the pass that wrote its inputs (and the regime in which a 2-byte pass moves half the bytes). Off ('hot'):
    repeated calls on the same inputs, which stay in cache where they fit (CPU-S levels 1-4 in float32 on a 32 MiB
    L3): the passes are then bound by their instructions, which a bfloat16 pass does not halve."""

    def __init__(self, on: bool):
        self.buf = torch.empty(max(2 * llc_bytes(), 64 << 20) // 4) if on else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.fill_(1.0)


def llc_bytes() -> int:
    try:
        idx = sorted(os.listdir("/sys/devices/system/cpu/cpu0/cache"))
        sizes = []
        for d in idx:
            if d.startswith("index"):
                with open(f"/sys/devices/system/cpu/cpu0/cache/{d}/size") as f:
                    v = f.read().strip()
                sizes.append(int(v[:-1]) * (1024 if v.endswith("K") else 1 << 20 if v.endswith("M") else 1))
        return max(sizes)
    except (OSError, ValueError):
        return 32 << 20


def paired_times(f32_fn, low_fn, rounds: int, evict: Evict) -> tuple[float, float, float]:
    """Median float32 time, median low-precision time and the median of the per-round ratios: each round times both,
    back to back (their order alternating), so that a slow stretch of a shared machine hits both sides of a ratio."""
    # warm-up: oneDNN primitive creation, measured algorithm choices, and the heap: glibc serves the first few
    # activation-sized outputs of a size from fresh (faulting) pages before its freed blocks coalesce into reusable
    # ones (one warm-up call left float32 bn_relu at level 0 at ~11 ms a call instead of ~2.4 ms)
    for _ in range(4):
        f32_fn(), low_fn()
    tf, tl = [], []

    def timed(fn):
        evict()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for r in range(rounds):
        if r % 2:
            tl.append(timed(low_fn))
            tf.append(timed(f32_fn))
        else:
            tf.append(timed(f32_fn))
            tl.append(timed(low_fn))
    return statistics.median(tf), statistics.median(tl), statistics.median(b / a for a, b in zip(tf, tl))


FLOOR = "floor: ATen copy"


def levels(quick: bool):
    if quick:
        return [(0, 16, 1, 32)]
    return [(i, 32 * 2**i, 4, 256 // 2**i) for i in range(5)]


def rnd(shape, dtype, layout, lo=None):
    t = torch.rand(*shape) + lo if lo is not None else torch.randn(*shape)
    t = t.to(dtype)
    if t.dim() == 4 and layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def standalone_cases(c, n, s, dtype, layout):
    """(name, fn) pairs: each fn runs one standalone op pass on fresh-per-case inputs."""
    u = torch.ops.unetx
    y = rnd((n, c, s, s), dtype, layout)
    scale, shift, mean = torch.rand(c) + 0.5, torch.randn(c), torch.randn(c) * 0.1  # BatchNorm vectors: float32
    g = rnd((n, c, s, s), dtype, layout)
    gp = rnd((n, c, s // 2, s // 2), dtype, layout)
    skip = rnd((n, c // 2, s, s), dtype, layout)
    xlow = rnd((n, c // 2, s // 2, s // 2), dtype, layout)
    gcat = rnd((n, c, s, s), dtype, layout)
    return [
        ("bn_relu", lambda: u.bn_relu(y, scale, shift, mean)),
        ("bn_relu_backward", lambda: u.bn_relu_backward(g, y, scale, shift, mean)),
        ("bn_relu_pool", lambda: u.bn_relu_pool(y, scale, shift, mean)),
        ("bn_relu_pool_backward", lambda: u.bn_relu_pool_backward(g, gp, y, scale, shift, mean)),
        ("avg_pool2x2", lambda: u.avg_pool2x2(y)),
        ("avg_pool2x2_backward", lambda: u.avg_pool2x2_backward(gp)),
        ("upsample_concat nearest", lambda: u.upsample_concat(skip, xlow, "nearest")),
        ("upsample_concat bilinear", lambda: u.upsample_concat(skip, xlow, "bilinear")),
        ("upsample_concat_backward nearest", lambda: u.upsample_concat_backward(gcat, c // 2, "nearest")),
        ("upsample_concat_backward bilinear", lambda: u.upsample_concat_backward(gcat, c // 2, "bilinear")),
    ]


LAYER_EVENTS = [
    "unetx::input_stage",
    "unetx::batch_stats",
    "unetx::fold_output_grad",
    "unetx::activation_backward",
    "unetx::upsample_backward",
    "unetx::to_planar",
]


def layer_passes(c, n, s, dtype, layout, evict):
    """A function that runs one round of three training layers of a level in conv_bn_relu forward+backward (the
    encoder's second: x normalised with its batch mean; a pooled one; a decoder one: x2 nearest) under
    torch.profiler and returns the mean time per call of each unetx:: pass in it."""
    from torch.profiler import ProfilerActivity, profile

    cl = layout == "channels_last"
    fmt = torch.channels_last if cl else torch.contiguous_format

    def make(cin, c2, pool):
        xs = 2 * s if pool else s
        x = rnd((n, cin, xs, xs), dtype, layout).requires_grad_()
        w = (torch.randn(c, cin + c2, 3, 3) * (9 * (cin + c2)) ** -0.5).to(dtype).contiguous(memory_format=fmt)
        w.requires_grad_()
        sc, sh = (torch.rand(cin) + 0.5).requires_grad_(), torch.randn(cin).requires_grad_()
        mu = (torch.randn(cin) * 0.1).requires_grad_()
        x2 = rnd((n, c2, s // 2, s // 2), dtype, layout).requires_grad_() if c2 else None

        def run():
            y, m, v = unetx.ops.conv_bn_relu(
                x,
                w,
                None,
                x_scale=sc,
                x_shift=sh,
                x_mean=mu,
                x_pool=pool,
                x2=x2,
                x2_mode="nearest" if c2 else "none",
                stats=True,
            )
            (y.float().mean() + m.sum() + v.sum()).backward()

        return run

    runs = [make(c, 0, False)]
    if s >= 4:
        runs.append(make(c // 2 if c > 16 else c, 0, True))
        runs.append(make(c // 2, c // 2, False))
    for r in runs:
        r()  # warm-up (and the weight gradient's measured choice)

    def one_round():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for r in runs:
                evict()
                r()
        return {e.key: e.cpu_time_total / 1e6 / e.count for e in prof.key_averages() if e.key in LAYER_EVENTS}

    return one_round


def layer_pass_times(c, n, s, low, layout, rounds, evict):
    """{event: (float32 s, low s, ratio)}: the mean time per call of each pass in one round of the layers, per
    dtype, rounds alternating dtypes; medians over rounds (as paired_times)."""
    f32_round = layer_passes(c, n, s, torch.float32, layout, evict)
    low_round = layer_passes(c, n, s, low, layout, evict)
    per = {k: ([], []) for k in LAYER_EVENTS}
    for r in range(rounds):
        if r % 2:
            b = low_round()
            a = f32_round()
        else:
            a = f32_round()
            b = low_round()
        for k in LAYER_EVENTS:
            if k in a and k in b:
                per[k][0].append(a[k])
                per[k][1].append(b[k])
    return {
        k: (statistics.median(tf), statistics.median(tl), statistics.median(y / x for x, y in zip(tf, tl)))
        for k, (tf, tl) in per.items()
        if tf
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument(
        "--cache",
        default="cold",
        choices=["cold", "hot"],
        help="cold: each timed call reads its inputs from memory, as in a training step (default); hot: repeated "
        "calls on inputs that stay in cache where they fit",
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--layout", default="channels_last", choices=["channels_last", "nchw"])
    p.add_argument(
        "--weight-grad",
        default="onednn_planar",
        help="the conv_bn_relu layers' weight gradient, forced (UNETX_CONV_ALGO); '' lets unetx measure. One that "
        "applies to both dtypes (not gemm: float32 only; not onednn_float32: low precision only)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (a smoke test)")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    if a.weight_grad in ("gemm", "onednn_float32"):
        p.error(f"--weight-grad {a.weight_grad} does not apply to both dtypes: use onednn, onednn_planar or ''")
    torch.set_num_threads(a.threads)
    keep_freed_memory()  # as `unetx bench` and the commands run (unetx/allocator.py)
    algo_choice.measure_afresh()  # as `unetx bench`: this run measures its own convolution choices
    if a.weight_grad:
        os.environ["UNETX_CONV_ALGO"] = f"weight_grad={a.weight_grad}"
    torch.manual_seed(0)
    rounds = 1 if a.quick else a.rounds
    low = getattr(torch, a.dtype)
    evict = Evict(a.cache == "cold")
    print(
        f"# unetx passes, {a.dtype} / float32, {a.layout}; {cpu_name()} [{cpu_flags()}], torch {torch.__version__}, "
        f"{a.threads} threads, {a.cache} cache, median of {rounds} rounds (ratio: median of the rounds' ratios)"
    )
    print(f"# conv_bn_relu weight gradient: {a.weight_grad or 'measured'}; conv_bn_relu rows: mean ms per call")
    print(f"| pass | level (C, HxW) | float32 ms | {a.dtype} ms | ratio |")
    print("|---|---|---|---|---|")
    rows = []

    def row(name, lvl, c, s, tf, tl, ratio):
        rows.append(dict(name=name, level=lvl, channels=c, size=s, float32_s=tf, low_s=tl, ratio=ratio))
        print(f"| {name} | {lvl} ({c}, {s}x{s}) | {tf * 1e3:.2f} | {tl * 1e3:.2f} | {ratio:.2f} |", flush=True)

    floors = {}
    for lvl, c, n, s in levels(a.quick):
        yf, yl = rnd((n, c, s, s), torch.float32, a.layout), rnd((n, c, s, s), low, a.layout)
        floors[lvl] = paired_times(yf.clone, yl.clone, rounds, evict)
        row(FLOOR, lvl, c, s, *floors[lvl])
        f32 = standalone_cases(c, n, s, torch.float32, a.layout)
        lo = standalone_cases(c, n, s, low, a.layout)
        for (name, ff), (_, fl) in zip(f32, lo):
            row(name, lvl, c, s, *paired_times(ff, fl, rounds, evict))
        for k, t in layer_pass_times(c, n, s, low, a.layout, rounds, evict).items():
            row(f"conv_bn_relu {k.split('::')[1]}", lvl, c, s, *t)
    passes = [r for r in rows if r["name"] != FLOOR]
    valid = [r["ratio"] for r in passes if r["float32_s"] > 0 and r["low_s"] > 0]
    if valid:
        print(
            f"\nworst {a.dtype}/float32 ratio {max(valid):.2f}, median {statistics.median(valid):.2f} "
            f"({len(valid)} rows; target <= 0.6); above 0.6: {sum(v > 0.6 for v in valid)}"
        )
        for lvl in sorted({r["level"] for r in passes}):
            lv = [r["ratio"] for r in passes if r["level"] == lvl]
            above = sum(v > 0.6 for v in lv)
            print(
                f"level {lvl}: median {statistics.median(lv):.2f}, worst {max(lv):.2f}, above 0.6: {above} of "
                f"{len(lv)}; floor (ATen copy of the level's activation): {floors[lvl][2]:.2f}"
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                dict(
                    cpu=cpu_name(),
                    flags=cpu_flags(),
                    torch=torch.__version__,
                    threads=a.threads,
                    dtype=a.dtype,
                    layout=a.layout,
                    cache=a.cache,
                    rounds=rounds,
                    rows=rows,
                ),
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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

--step measures the passes where users meet them instead: whole CPU-S training steps (`unetx bench`'s workload,
unetx eager channels_last, fused Adam), float32 against the same step under bf16 autocast, each unetx:: pass's self
time per step from torch.profiler, profiled steps alternating between the precisions. There the convolutions are
each chosen by measurement (with Winograd, most input stages are built in cache, band by band, and never run as a
pass of their own), and a layer's path may differ between the precisions: calls are paired by the shape of the tensor
each pass's event records (layers of different shapes apart) where both precisions made as many calls of it, and
the others are shown apart (pair_rounds).

    python bench/bf16_passes.py [--threads 2] [--dtype bfloat16] [--layout channels_last] [--cache cold|hot]
                                [--rounds 9] [--json out.json]
    python bench/bf16_passes.py --step [--upsample transpose|nearest|bilinear] [--rounds 5]
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


# The passes inside conv_bn_relu (LAYER_EVENTS) and the fused op's own work around its kernels; the other unetx::
# events of a CPU-S step are its convolutions (compute-bound GEMMs, float32 inside in either precision).
GLUE_EVENTS = ["unetx::conv_bn_relu", "unetx::conv_bn_relu_backward"]


def pair_rounds(f32_rounds: list[dict], low_rounds: list[dict]) -> dict:
    """Each unetx event's float32 and low-precision time in a step, its calls paired across the precisions.

    A round is {(event, recorded input shapes): (self ms, calls)} of one profiled step; round i of each precision
    were run back to back. Calls pair by the shapes their event recorded (a layer's tensor: layers of different
    shapes apart, those of one shape together) where both precisions made as many calls of that shape; the others,
    and every call of an event that records no shapes (the convolutions), are unpaired. Returns {event: dict of
    float32_ms, low_ms (paired, per step), ratio (the median of the rounds' low / float32 ratios), paired_calls,
    unpaired_float32_ms, unpaired_low_ms, unpaired_float32_calls, unpaired_low_calls}: medians over the rounds, an
    event absent from a round counting as zero there."""
    fields = ("float32_ms", "low_ms", "paired_calls", "unpaired_float32_ms", "unpaired_low_ms")
    fields += ("unpaired_float32_calls", "unpaired_low_calls")
    per_round = []
    for pf, pl in zip(f32_rounds, low_rounds):
        acc: dict[str, dict] = {}
        for key in set(pf) | set(pl):
            (tf, cf), (tl, cl) = pf.get(key, (0.0, 0)), pl.get(key, (0.0, 0))
            v = acc.setdefault(key[0], dict.fromkeys(fields, 0))
            if cf and cf == cl and key[1] not in ("", "[]"):
                v["float32_ms"] += tf
                v["low_ms"] += tl
                v["paired_calls"] += cf
            else:
                v["unpaired_float32_ms"] += tf
                v["unpaired_low_ms"] += tl
                v["unpaired_float32_calls"] += cf
                v["unpaired_low_calls"] += cl
        per_round.append(acc)
    out = {}
    for e in {e for acc in per_round for e in acc}:
        vals = [acc.get(e, dict.fromkeys(fields, 0)) for acc in per_round]
        out[e] = {f: statistics.median(v[f] for v in vals) for f in fields}
        for f in ("paired_calls", "unpaired_float32_calls", "unpaired_low_calls"):
            out[e][f] = round(out[e][f])
        ratios = [v["low_ms"] / v["float32_ms"] for v in vals if v["float32_ms"] > 0]
        out[e]["ratio"] = statistics.median(ratios) if ratios else float("nan")
    return out


def together_ratio(f32_rounds: list[dict], low_rounds: list[dict], events) -> float:
    """The median over rounds of (the paired calls of `events`, low-precision time summed) / (float32's)."""
    ratios = []
    for pf, pl in zip(f32_rounds, low_rounds):
        r = pair_rounds([pf], [pl])
        tf = sum(r[e]["float32_ms"] for e in events if e in r)
        tl = sum(r[e]["low_ms"] for e in events if e in r)
        if tf > 0:
            ratios.append(tl / tf)
    return statistics.median(ratios) if ratios else float("nan")


def step_profiles(low: str, rounds: int, upsample: str, quick: bool) -> tuple[dict, dict]:
    """({precision: [round: {(event, input shapes): (self ms, calls)}]}, {precision: step s}) for the unetx:: events
    of CPU-S training steps (unetx eager channels_last), float32 and under `low` autocast: torch.profiler's self time
    per step, the rounds alternating the precisions' order; step times are the median of the unprofiled step before
    each profiled one."""
    import dataclasses

    from torch.profiler import ProfilerActivity, profile
    from unetx import bench as ub

    cpu_s = ub.WORKLOADS["CPU-S"]
    cfg = dict(cpu_s.config, upsample=upsample)
    if quick:
        cfg.update(base_channels=8, depth=2)
    cases = {}
    for name, ac in (("float32", None), (low, low)):
        w = dataclasses.replace(
            cpu_s, autocast=ac, config=cfg, batch=1 if quick else cpu_s.batch, size=32 if quick else cpu_s.size
        )
        state, x, target = ub._inputs(w)
        case = ub.Case(w, ub.Form("unetx", "channels_last"), "train", state, x, target)
        for _ in range(2):  # the first step measures the convolution choices
            case.step()
        cases[name] = case
    steps = {k: [] for k in cases}
    profiles = {k: [] for k in cases}
    for r in range(rounds):
        for k in list(cases) if r % 2 == 0 else list(cases)[::-1]:
            t0 = time.perf_counter()
            cases[k].step()
            steps[k].append(time.perf_counter() - t0)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                cases[k].step()
            profiles[k].append(
                {
                    (e.key, str(e.input_shapes)): (e.self_cpu_time_total / 1e3, e.count)
                    for e in prof.key_averages(group_by_input_shape=True)
                    if e.key.startswith("unetx::")
                }
            )
    return profiles, {k: statistics.median(v) for k, v in steps.items()}


def write_json(a, **fields) -> None:
    """The run's rows and settings into --json, with the machine and torch they were measured on."""
    head = dict(cpu=cpu_name(), flags=cpu_flags(), torch=torch.__version__, threads=a.threads, dtype=a.dtype)
    with open(a.json, "w") as f:
        json.dump(dict(head, **fields), f, indent=1)


def main_step(a) -> int:
    rows = []
    rounds = 1 if a.quick else a.rounds
    profiles, steps = step_profiles(a.dtype, rounds, a.upsample, a.quick)
    times = pair_rounds(profiles["float32"], profiles[a.dtype])
    algo = os.environ.get("UNETX_CONV_ALGO")
    print(
        f"# unetx passes in a CPU-S training step ({a.upsample} upsampling{', quick: tiny' if a.quick else ''}), "
        f"{a.dtype} autocast / float32, unetx eager channels_last; {cpu_name()} [{cpu_flags()}], torch "
        f"{torch.__version__}, {a.threads} threads, self time per step (torch.profiler), median of {rounds} rounds"
        + (f"; UNETX_CONV_ALGO={algo} (from the environment)" if algo else "")
    )
    print(f"# step (unprofiled, median): float32 {steps['float32']:.3f} s, {a.dtype} {steps[a.dtype]:.3f} s")
    print(
        "# paired: calls of one recorded shape, as many in both precisions (ratio: median of the rounds' ratios); "
        "unpaired: the others, and the convolutions (their events record no shapes)"
    )
    print(
        f"| event | kind | paired calls | float32 ms | {a.dtype} ms | ratio | unpaired: float32 / {a.dtype} ms "
        "(calls) |"
    )
    print("|---|---|---|---|---|---|---|")
    order = sorted(times.items(), key=lambda kv: -(kv[1]["float32_ms"] + kv[1]["unpaired_float32_ms"]))
    for key, t in order:
        kind = "pass" if key in LAYER_EVENTS else "op glue" if key in GLUE_EVENTS else "other (a convolution)"
        rows.append(dict(name=key, kind=kind, **t))
        ucf, ucl = t["unpaired_float32_calls"], t["unpaired_low_calls"]
        unpaired = f"{t['unpaired_float32_ms']:.1f} ({ucf}) / {t['unpaired_low_ms']:.1f} ({ucl})" if ucf or ucl else "-"
        print(
            f"| {key} | {kind} | {t['paired_calls']} | {t['float32_ms']:.1f} | {t['low_ms']:.1f} | {t['ratio']:.2f} "
            f"| {unpaired} |",
            flush=True,
        )
    passes = [r for r in rows if r["kind"] == "pass" and r["paired_calls"]]
    if passes:
        worst = max(passes, key=lambda r: r["ratio"])
        together = together_ratio(profiles["float32"], profiles[a.dtype], [r["name"] for r in passes])
        print(
            f"\npasses (paired calls): worst {a.dtype}/float32 ratio {worst['ratio']:.3f} ({worst['name']}); all "
            f"together {together:.3f} (median of the rounds' ratios; target <= 0.6 each)"
        )
    if a.json:
        write_json(a, upsample=a.upsample, rounds=rounds, unetx_conv_algo=algo, step_s=steps, rows=rows)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None, help="rounds per figure (default 9; 5 with --step)")
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
    p.add_argument(
        "--step",
        action="store_true",
        help="the passes in whole CPU-S training steps, float32 against autocast (see the top of this file)",
    )
    p.add_argument(
        "--upsample",
        default="transpose",
        choices=["transpose", "nearest", "bilinear"],
        help="with --step: CPU-S's upsampling (nearest / bilinear: the stage upsamples and concatenates, 1x1 conv)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (a smoke test)")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    if a.weight_grad in ("gemm", "onednn_float32") and not a.step:
        p.error(f"--weight-grad {a.weight_grad} does not apply to both dtypes: use onednn, onednn_planar or ''")
    if a.step:
        # a step runs as users run it: channels_last, every convolution (weight gradients too) measured
        for opt, given, allowed in (
            ("--layout", a.layout, ("channels_last",)),
            ("--cache", a.cache, ("cold",)),
            ("--weight-grad", a.weight_grad, (p.get_default("weight_grad"), "")),
        ):
            if given not in allowed:
                p.error(f"{opt} {given} does not apply to --step (leave it out)")
    elif a.upsample != "transpose":
        p.error(f"--upsample {a.upsample} applies to --step only (add --step)")
    if a.rounds is not None and a.rounds < 1:
        p.error(f"--rounds {a.rounds}: give 1 or more")
    torch.set_num_threads(a.threads)
    keep_freed_memory()  # as `unetx bench` and the commands run (unetx/allocator.py)
    algo_choice.measure_afresh()  # as `unetx bench`: this run measures its own convolution choices
    torch.manual_seed(0)
    if a.step:
        a.rounds = a.rounds or 5
        return main_step(a)
    low = getattr(torch, a.dtype)
    if a.weight_grad:
        os.environ["UNETX_CONV_ALGO"] = f"weight_grad={a.weight_grad}"
    rounds = 1 if a.quick else (a.rounds or 9)
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
        write_json(a, layout=a.layout, cache=a.cache, rounds=rounds, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

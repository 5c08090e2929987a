"""torch.profiler on one CPU-S training step, unetx and stock PyTorch, in float32 or under bf16 autocast: the top ops
by self time (torch.profiler key_averages), which dtypes the convolutions ran in, and unetx's measured convolution
choices (cpu/algo_choice.h).

    python bench/profile_step.py --autocast bfloat16 --threads 2 [--impl unetx|stock|both] [--top 10]
        [--upsample nearest]  (CPU-S with another upsampling: its 1x1 convolutions)
        [--floor]  (unetx: also profile its convolution floor and list where the step spends time the floor does not)

GFLOP per step are stock's (unetx.bench.flops.step_flops): with nearest / bilinear upsampling unetx convolves the 1x1
layers at the low resolution, a quarter of stock's work there (about 3% of the step's count).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from unetx import bench as ub
from unetx.allocator import keep_freed_memory
from unetx.bench.flops import step_flops
from unetx.ops import algo_choice


def _self_ms(prof) -> dict[str, tuple[float, int]]:
    return {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}


def _floor_diff(case, prof, top: int) -> None:
    """Profile the convolution floor (unetx.bench.convs: the step's convolutions replayed alone, its own measured
    choices) the way the step was profiled, and list the ops by how much their self time differs, largest first
    (negative: more in the floor): what step / its convolutions is made of, each op inflated by the profiler's
    per-call cost (bench/perf_step.py samples instead)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    from unetx.bench.convs import conv_replay, record_convs

    run = conv_replay(record_convs(case), torch.device("cpu"))
    for _ in range(2):
        run()
    t0 = time.perf_counter()
    run()
    unprofiled = time.perf_counter() - t0
    with tprofile(activities=[ProfilerActivity.CPU], record_shapes=True) as fprof:
        run()
    step, floor = _self_ms(prof), _self_ms(fprof)
    total_s = sum(v[0] for v in step.values())
    total_f = sum(v[0] for v in floor.values())
    print(
        f"\n## the step above minus its convolution floor: floor {unprofiled:.3f} s unprofiled; profiled self time "
        f"step {total_s:.1f} ms, floor {total_f:.1f} ms, difference {total_s - total_f:.1f} ms"
    )
    rows = []
    for k in set(step) | set(floor):
        (ts, ns), (tf, nf) = step.get(k, (0.0, 0)), floor.get(k, (0.0, 0))
        rows.append((ts - tf, k, ts, ns, tf, nf))
    rows.sort(key=lambda r: -abs(r[0]))
    print(f"  {'step - floor':>12}  {'step ms (calls)':>17}  {'floor ms (calls)':>17}  op")
    for d, k, ts, ns, tf, nf in rows[:top]:
        print(f"  {d:10.1f} ms  {ts:9.1f} ({ns:5d})  {tf:9.1f} ({nf:5d})  {k[:70]}")


def profile(
    impl: str, autocast: str | None, threads: int, top: int, layout: str, upsample: str, floor: bool = False
) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    torch.set_num_threads(threads)
    keep_freed_memory()  # as `unetx bench` and the other commands run (unetx/allocator.py)
    algo_choice.measure_afresh()  # as `unetx bench`: this run measures its own convolution choices
    cpu_s = ub.WORKLOADS["CPU-S"]
    w = dataclasses.replace(cpu_s, autocast=autocast, config=dict(cpu_s.config, upsample=upsample))
    gflop = step_flops(w, "train") / 1e9
    state, x, target = ub._inputs(w)
    case = ub.Case(w, ub.Form(impl, layout), "train", state, x, target)
    for _ in range(2):
        case.step()
    t0 = time.perf_counter()
    case.step()
    unprofiled = time.perf_counter() - t0
    with tprofile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        case.step()
    print(
        f"\n## {impl} eager {layout}, {autocast or 'float32'}: step {unprofiled:.3f} s unprofiled "
        f"({gflop / unprofiled:.0f} GFLOP/s at {gflop:.0f} GFLOP per step; upsample {upsample})"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))
    dtypes: dict[str, float] = {}
    for e in prof.events():
        if e.name in (
            "aten::mkldnn_convolution",
            "aten::convolution_backward",
            "aten::_slow_conv2d_forward",
            "aten::mkldnn_convolution_backward",
            "aten::convolution_backward_overrideable",
        ):
            key = f"{e.name} {getattr(e, 'input_dtypes', None) or ''}"
            dtypes[key] = dtypes.get(key, 0.0) + e.cpu_time_total / 1e3
    for k, v in sorted(dtypes.items(), key=lambda kv: -kv[1]):
        print(f"  {v:8.1f} ms  {k}")
    if impl == "unetx":
        import unetx

        print("convolution choices (unetx._C.algo_choices(): key -> chosen, measured ms; loaded: measured earlier):")
        for d in sorted(unetx._C.algo_choices(), key=lambda d: d["key"]):
            t = ", ".join(f"{k} {v * 1e3:.1f}" if v is not None else f"{k} -" for k, v in d["seconds"].items())
            print(f"  {d['family']} {d['key']}: {d['chosen']} ({t}){' loaded' if d['loaded'] else ''}")
        if floor:  # after the step's choices are listed: the floor measures its own under other keys
            _floor_diff(case, prof, top)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--autocast", choices=["bfloat16", "float16"], default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--impl", choices=["unetx", "stock", "both"], default="both")
    p.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--upsample", choices=["transpose", "nearest", "bilinear"], default="transpose")
    p.add_argument("--floor", action="store_true", help="unetx: profile its convolution floor too")
    a = p.parse_args(argv)
    for impl in ["unetx", "stock"] if a.impl == "both" else [a.impl]:
        profile(impl, a.autocast, a.threads, a.top, a.layout, a.upsample, a.floor)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

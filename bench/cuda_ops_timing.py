"""Op-level timing of the unetx CUDA kernels against the stock reference composition (unetx.reference), side by side.

Every row is a pair measured the same way in the same process: unetx's op (torch.ops.unetx, served by the compiled
CUDA kernels: needs UNETX_CUDA_KERNELS=1, which this script sets before importing unetx) and the plain-PyTorch
reference of the same op (the single source of truth the tests compare against), on the same random inputs.

Measured per (op, U-Net stage shape, dtype, layout):
  fwd_ms      forward, median over repetitions of CUDA-event-timed loops after warm-up
  step_ms     forward + backward (autograd, the same random cotangents for every output on both sides)
  held_MiB    memory still allocated after the forward (outputs + what autograd saved for backward)
  peak_MiB    peak allocated memory during forward + backward, above what was allocated before
  GB/s        ours, forward: the op's compulsory bytes (read once + write once, as each kernel's header comment
              counts them) over fwd_ms; the convolution rows leave it out (cuDNN's traffic is not ours)
  err         max |op - float64 reference| / max |reference| over the forward outputs, ours and stock (a sanity
              column: the tests hold the real accuracy bars)

    UNETX_CUDA_KERNELS=1 python3 bench/cuda_ops_timing.py --out results/     # all stages, bf16 + fp32, NHWC
    python3 bench/cuda_ops_timing.py --quick                                 # two stages, fewer repetitions
    python3 bench/cuda_ops_timing.py --device cpu --stages 4 --batch 1       # the script itself, on the CPU kernels

Shapes (batch 4, base 64 channels, 512 x 512 input): the activation of each U-Net stage. Tensors of the deep
stages fit in the 50 MB L2 cache of an H100, so their GB/s can exceed DRAM bandwidth (for both columns alike).
float32 convolutions use cuDNN's defaults (TF32 allowed) on both sides.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("UNETX_CUDA_KERNELS", "1")  # before unetx is imported: register the compiled CUDA kernels

import torch
import unetx
from unetx import ops
from unetx import reference as ref

MiB = 2**20
DEVICE = "cuda"  # --device
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
# (channels, height = width) of each stage of a depth-4, base-64 U-Net on a 512 x 512 input
STAGES = [(64, 512), (128, 256), (256, 128), (512, 64), (1024, 32)]


@dataclass
class Case:
    op: str
    stage: str
    shape: tuple
    inputs: dict  # name -> tensor (leaves that require grad where a gradient exists)
    ours: Callable  # (**inputs) -> output or tuple of outputs
    stock: Callable
    bytes_fwd: int | None  # compulsory forward traffic of our kernels, None for the conv rows


@dataclass
class Row:
    op: str
    stage: str
    dtype: str
    layout: str
    shape: tuple
    ours_fwd_ms: float
    stock_fwd_ms: float
    ours_step_ms: float
    stock_step_ms: float
    ours_held_MiB: float
    stock_held_MiB: float
    ours_peak_MiB: float
    stock_peak_MiB: float
    ours_GBps: float | None
    ours_err: float
    stock_err: float


# ------------------------------------------------------------------------------------------ inputs
def _randn(shape, dtype, fmt, gen, mean=0.0, std=1.0) -> torch.Tensor:
    t = torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32) * std + mean
    return t.to(dtype).contiguous(memory_format=fmt).requires_grad_(True)


def _vec(c, dtype, gen, lo=None, std=1.0, mean=0.0) -> torch.Tensor:
    """A per-channel vector, in the data's dtype (so the stock composition computes in that dtype too)."""
    if lo is not None:
        v = torch.rand(c, generator=gen, device=DEVICE) * (2 - lo) + lo
    else:
        v = torch.randn(c, generator=gen, device=DEVICE) * std + mean
    return v.to(dtype).requires_grad_(True)


def _as_tuple(r) -> tuple:
    return tuple(r) if isinstance(r, (tuple, list)) else (r,)


def make_cases(n: int, stages, dtype: torch.dtype, fmt: torch.memory_format, gen) -> list[Case]:
    e = torch.tensor([], dtype=dtype).element_size()
    cases = []
    for c, s in stages:
        stage = f"{c}x{s}"
        shape = (n, c, s, s)
        low = (n, c, s // 2, s // 2)
        numel = n * c * s * s

        def y():  # a stage's conv output (mean ~ 0.5, std ~ 1)
            return _randn(shape, dtype, fmt, gen, mean=0.5)

        def act():  # y with its BatchNorm folded into mean / scale / shift
            return dict(
                y=y(),
                scale=_vec(c, dtype, gen, lo=0.5),
                shift=_vec(c, dtype, gen, std=0.5),
                mean=_vec(c, dtype, gen, std=0.1, mean=0.5),
            )

        def weight(co, ci):
            w = torch.randn(co, ci, 3, 3, generator=gen, device=DEVICE) * (9 * ci) ** -0.5
            return w.to(dtype).contiguous(memory_format=fmt).requires_grad_(True)

        cases.append(Case("bn_relu", stage, shape, act(), ops.bn_relu, ref.bn_relu, 2 * numel * e))
        cases.append(
            Case("bn_relu_pool", stage, shape, act(), ops.bn_relu_pool, ref.bn_relu_pool, int((2 + 1 / 4) * numel * e))
        )
        cases.append(
            Case(
                "avg_pool2x2", stage, shape, dict(x=y()), ops.avg_pool2x2, ref.avg_pool2x2, int((1 + 1 / 4) * numel * e)
            )
        )
        for mode in ("nearest", "bilinear"):
            cases.append(
                Case(
                    f"upsample_concat[{mode}]",
                    stage,
                    shape,
                    dict(skip=y(), x=_randn(low, dtype, fmt, gen)),
                    lambda mode=mode, **t: ops.upsample_concat(t["skip"], t["x"], mode),
                    lambda mode=mode, **t: ref.upsample_concat(t["skip"], t["x"], mode),
                    # skip read + written, x read, its upsampling written
                    int((2 + 1 / 4 + 1) * numel * e),
                )
            )
        # the fused layer, 3x3, training (batch statistics); input stage: the previous layer's BatchNorm + ReLU
        a = act()
        layer = dict(x=a["y"], x_scale=a["scale"], x_shift=a["shift"], x_mean=a["mean"], weight=weight(c, c))
        cases.append(
            Case(
                "conv_bn_relu[bn-relu-conv-stats]",
                stage,
                shape,
                layer,
                lambda **t: ops.conv_bn_relu(
                    t["x"], t["weight"], x_scale=t["x_scale"], x_shift=t["x_shift"], x_mean=t["x_mean"], stats=True
                ),
                lambda **t: ref.conv_bn_relu(
                    t["x"],
                    t["x_scale"],
                    t["x_shift"],
                    False,
                    None,
                    "none",
                    t["weight"],
                    None,
                    False,
                    True,
                    False,
                    t["x_mean"],
                ),
                None,
            )
        )
        # the decoder's first layer: the skip (normalised on the fly) ++ the nearest-upsampled low-resolution input
        a = act()
        dec = dict(
            x=a["y"],
            x_scale=a["scale"],
            x_shift=a["shift"],
            x_mean=a["mean"],
            x2=_randn(low, dtype, fmt, gen),
            weight=weight(c, 2 * c),
        )
        cases.append(
            Case(
                "conv_bn_relu[skip++up2x-conv-stats]",
                stage,
                shape,
                dec,
                lambda **t: ops.conv_bn_relu(
                    t["x"],
                    t["weight"],
                    x_scale=t["x_scale"],
                    x_shift=t["x_shift"],
                    x_mean=t["x_mean"],
                    x2=t["x2"],
                    x2_mode="nearest",
                    stats=True,
                ),
                lambda **t: ref.conv_bn_relu(
                    t["x"],
                    t["x_scale"],
                    t["x_shift"],
                    False,
                    t["x2"],
                    "nearest",
                    t["weight"],
                    None,
                    False,
                    True,
                    False,
                    t["x_mean"],
                ),
                None,
            )
        )
    return cases


# ------------------------------------------------------------------------------------------ measuring
def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _live(outputs) -> list[torch.Tensor]:
    return [o for o in outputs if o is not None and o.numel() > 0 and o.requires_grad]


def _grad_inputs(inputs: dict) -> list[torch.Tensor]:
    return [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]


def time_ms(fn: Callable[[], object], warmup: int, iters: int, reps: int) -> float:
    """Median over reps of the mean time per call of `iters` back-to-back calls (CUDA events), after warm-up."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        if DEVICE != "cuda":
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / iters)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def memory_MiB(fwd: Callable[[], tuple], step: Callable[[], None]) -> tuple[float, float]:
    """(held after forward, peak during forward + backward), above what was allocated before."""
    if DEVICE != "cuda":
        return float("nan"), float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    outs = fwd()
    torch.cuda.synchronize()
    held = (torch.cuda.memory_allocated() - base) / MiB
    del outs
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return held, (torch.cuda.max_memory_allocated() - base) / MiB


def forward_error(fn: Callable, inputs: dict, exact: tuple) -> float:
    with torch.no_grad():
        outs = _as_tuple(fn(**inputs))
    err = 0.0
    for o, x in zip(outs, exact):
        if x.numel() == 0:
            continue
        e = ((o.double() - x).abs().max() / x.abs().max().clamp_min(1e-30)).item()
        err = e if not e <= err else err  # NaN wins
    return err


def measure(case: Case, dtype_name: str, layout: str, args, gen) -> Row:
    inputs = case.inputs
    grads_in = _grad_inputs(inputs)
    with torch.no_grad():
        exact = _as_tuple(
            case.stock(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
        )
    ours_err, stock_err = forward_error(case.ours, inputs, exact), forward_error(case.stock, inputs, exact)
    del exact
    # the same cotangent values for both sides (each side gets them in its outputs' dtypes)
    cots32 = [torch.randn(o.shape, generator=gen, device=DEVICE) for o in _live(_as_tuple(case.ours(**inputs)))]

    res = {}
    for side, fn in (("ours", case.ours), ("stock", case.stock)):

        def fwd(fn=fn):
            return _as_tuple(fn(**inputs))

        def fwd_nograd(fwd=fwd):
            with torch.no_grad():
                return fwd()

        live = _live(fwd())
        assert len(live) == len(cots32), f"{case.op}: {side} has {len(live)} differentiable outputs, not {len(cots32)}"
        cots = [c.to(o.dtype) for c, o in zip(cots32, live)]
        del live

        def step(fwd=fwd, cots=cots):
            torch.autograd.grad(_live(fwd()), grads_in, cots, allow_unused=True)

        held, peak = memory_MiB(fwd, step)
        res[side] = dict(
            fwd=time_ms(fwd_nograd, args.warmup, args.iters, args.reps),
            step=time_ms(step, args.warmup, args.iters, args.reps),
            held=held,
            peak=peak,
        )
    gbps = None if case.bytes_fwd is None else case.bytes_fwd / (res["ours"]["fwd"] * 1e-3) / 1e9
    return Row(
        case.op,
        case.stage,
        dtype_name,
        layout,
        case.shape,
        res["ours"]["fwd"],
        res["stock"]["fwd"],
        res["ours"]["step"],
        res["stock"]["step"],
        res["ours"]["held"],
        res["stock"]["held"],
        res["ours"]["peak"],
        res["stock"]["peak"],
        gbps,
        ours_err,
        stock_err,
    )


# ------------------------------------------------------------------------------------------ report
def format_table(rows: list[Row]) -> str:
    head = (
        f"{'op':36} {'stage':8} {'dtype':5} {'layout':13} {'fwd ms ours/stock':>19} {'x':>5} "
        f"{'step ms ours/stock':>20} {'x':>5} {'held MiB o/s':>15} {'peak MiB o/s':>15} {'GB/s':>6} "
        f"{'err ours/stock':>17}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        gb = "" if r.ours_GBps is None else f"{r.ours_GBps:6.0f}"
        lines.append(
            f"{r.op:36} {r.stage:8} {r.dtype:5} {r.layout:13} {r.ours_fwd_ms:9.3f}/{r.stock_fwd_ms:<9.3f} "
            f"{r.stock_fwd_ms / r.ours_fwd_ms:5.2f} {r.ours_step_ms:10.3f}/{r.stock_step_ms:<9.3f} "
            f"{r.stock_step_ms / r.ours_step_ms:5.2f} {r.ours_held_MiB:7.0f}/{r.stock_held_MiB:<7.0f} "
            f"{r.ours_peak_MiB:7.0f}/{r.stock_peak_MiB:<7.0f} {gb:>6} {r.ours_err:8.1e}/{r.stock_err:<8.1e}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    global DEVICE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench-results"), help="folder for the JSON and the table")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtypes", default="bf16,fp32", help=f"comma list of {sorted(DTYPES)}")
    p.add_argument("--layouts", default="channels_last", help=f"comma list of {sorted(LAYOUTS)}")
    p.add_argument("--stages", default="all", help="'all' or comma list of stage indices 0..4 (0 = 64 x 512^2)")
    p.add_argument("--ops", default="", help="only ops whose name contains one of these comma-separated strings")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="stages 1 and 3, 2 repetitions of 5 calls: a smoke run")
    p.add_argument("--device", default="cuda", help="cuda (the point), or cpu to try the script on the CPU kernels")
    args = p.parse_args(argv)
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("cuda_ops_timing: no CUDA device", file=sys.stderr)
        return 2
    if DEVICE == "cuda" and not ops.cuda_kernels_enabled():
        print(
            "cuda_ops_timing: the compiled CUDA kernels are not enabled (built without CUDA, or "
            "UNETX_CUDA_KERNELS=0 in the environment); nothing to compare",
            file=sys.stderr,
        )
        return 2
    stages = STAGES if args.stages == "all" else [STAGES[int(i)] for i in args.stages.split(",")]
    if args.quick:
        stages, args.reps, args.iters = [STAGES[1], STAGES[3]], 2, 5
    if DEVICE == "cuda":
        torch.backends.cudnn.benchmark = True  # both sides get cuDNN's best convolution algorithm
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows: list[Row] = []
    for dname in args.dtypes.split(","):
        for lname in args.layouts.split(","):
            for case in make_cases(args.batch, stages, DTYPES[dname], LAYOUTS[lname], gen):
                if args.ops and not any(s in case.op for s in args.ops.split(",")):
                    continue
                rows.append(measure(case, dname, lname, args, gen))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    meta = dict(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else (platform.processor() or "cpu"),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if DEVICE == "cuda" else None,
        unetx=unetx.build_info(),
        python=platform.python_version(),
        command=" ".join([sys.executable, *sys.argv]),
        batch=args.batch,
        warmup=args.warmup,
        iters=args.iters,
        reps=args.reps,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    (out / "cuda_ops_timing.json").write_text(json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=1))
    (out / "cuda_ops_timing.txt").write_text(f"{json.dumps(meta)}\n\n{table}\n")
    print(f"\n{meta['date']}  {meta['device']}  torch {meta['torch']}  batch {args.batch}\n{table}")
    print(f"\nwritten: {out / 'cuda_ops_timing.json'}, {out / 'cuda_ops_timing.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

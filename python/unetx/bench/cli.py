"""`unetx bench` / `python -m unetx.bench`: the command line over run() and the comparison table."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..nn.common import check_config
from ..ops import algo_choice
from .runner import SPEED_FLAGS, run
from .table import format_across_precisions, format_table
from .workloads import WORKLOADS, BenchConfigError

DESCRIPTION = (
    "Time and measure unetx.UNet against the same network in stock PyTorch (eager NCHW, channels_last, "
    "torch.compile) and print one markdown table, ratios first."
)


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `unetx bench` options, on any parser (a CLI subcommand's, or build_parser's)."""
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default=None,
        help="a named workload (default: CPU-S on cpu, GPU-L on cuda); the options below override it",
    )
    ap.add_argument("--size", type=int, default=None, help="image height and width (CPU-S: 256)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (CPU-S: 4)")
    ap.add_argument("--in-channels", type=int, default=None)
    ap.add_argument("--out-channels", type=int, default=None)
    ap.add_argument("--base-channels", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--pool", choices=["avg", "max"], default=None)
    ap.add_argument("--upsample", choices=["transpose", "nearest", "bilinear"], default=None)
    ap.add_argument(
        "--autocast",
        choices=["bfloat16", "float16", "both"],
        default=None,
        help="autocast dtype (default: float32, no autocast); both: float32 and bfloat16 side by side, and the "
        "fastest form at either precision compared",
    )
    ap.add_argument(
        "--compile", action="store_true", help="also time torch.compile forms (minutes of compilation on a small CPU)"
    )
    ap.add_argument("--max-autotune", action="store_true", help="with --compile, add torch.compile max-autotune")
    ap.add_argument("--compile-unetx", action="store_true", help="with --compile, also unetx under torch.compile")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds; the median is reported (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--task", choices=["train", "eval", "both"], default="both")
    ap.add_argument("--json", default=None, help="also write the raw results (every sample) to this file")
    ap.add_argument("--quiet", action="store_true", help="print only the table")
    return ap


def build_parser(prog: str = "unetx bench") -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION))


def _positive(v: int | None, name: str) -> None:
    if v is not None and v < 1:
        raise SystemExit(f"unetx bench: {name} must be a positive integer, got {v}")


def named_workload(args: argparse.Namespace, autocast: str | None, configured: bool) -> str | None:
    """The named workload a run of CPU-S's network at this precision is: CPU-S in float32, CPU-S-bf16 under bfloat16
    autocast, each with its targets (so `unetx bench --autocast bfloat16` checks CPU-S-bf16's). None for anything
    else (float16, another device, size, batch or configuration: a custom run, without targets)."""
    cpu_s = args.device == "cpu" and (args.workload or "CPU-S") == "CPU-S"
    if not cpu_s or configured or args.size or args.batch:
        return None
    return {None: "CPU-S", "bfloat16": "CPU-S-bf16"}.get(autocast)


def run_args(args: argparse.Namespace) -> int:
    """Run `unetx bench` from parsed arguments (see add_arguments); prints the table. Returns the exit code."""
    from ..allocator import keep_freed_memory

    try:
        keep_freed_memory()  # as the other commands run, for stock PyTorch and unetx alike (see unetx/allocator.py)
    except ValueError as e:
        raise SystemExit(f"unetx bench: error: {e}") from None
    algo_choice.measure_afresh()  # runs stay independent samples (unetx/ops/algo_choice.py)
    for name in ("size", "batch", "rounds", "threads"):
        _positive(getattr(args, name), "--" + name)
    cfg = {
        k: getattr(args, k)
        for k in ("in_channels", "out_channels", "base_channels", "depth", "pool", "upsample")
        if getattr(args, k) is not None
    }
    if cfg:
        base = WORKLOADS[args.workload or ("CPU-S" if args.device == "cpu" else "GPU-L")].config
        try:
            check_config(**dict(base, **cfg), dropout=0.0)
        except ValueError as e:
            raise SystemExit(f"unetx bench: {e}") from None
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    tasks = ("train", "eval") if args.task == "both" else (args.task,)
    precisions = [None, "bfloat16"] if args.autocast == "both" else [args.autocast]
    results = []
    try:
        for autocast in precisions:
            named = named_workload(args, autocast, bool(cfg))
            result = run(
                args.device,
                args.size,
                workload=named or args.workload,
                batch=args.batch,
                config=cfg or None,
                autocast=None if named else autocast,
                compile=args.compile,
                max_autotune=args.max_autotune,
                compile_unetx=args.compile_unetx,
                rounds=args.rounds,
                threads=args.threads,
                tasks=tasks,
                log=log,
            )
            if len(precisions) > 1 and not named:  # one table, a row group per precision
                result["workload"] = f"{result['workload']} {autocast or 'float32'}"
            results.append(result)
    except BenchConfigError as e:
        raise SystemExit(str(e)) from None
    m = results[0]["machine"]
    if not args.quiet:
        flags = " ".join(m.get("cpu_flags", [])) or "none of " + ", ".join(SPEED_FLAGS)
        print(
            "\n".join(f"{r['workload']}: {r['description']}" for r in results)
            + f"\n{m.get('gpu') or m['cpu']} ({m['cores']} CPU cores, {m['threads']} threads; CPU flags: {flags}), "
            f"torch {m['torch']}, {m.get('allocator', 'malloc not recorded')}, medians of {args.rounds} interleaved "
            "rounds\n"
        )
    print(format_table(results if len(results) > 1 else results[0]), flush=True)
    across = format_across_precisions(results)
    if across:
        print(across, flush=True)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results if len(results) > 1 else results[0], f, indent=1)
        os.replace(tmp, args.json)
    return 0


def main(argv: list[str] | None = None, prog: str = "unetx bench") -> int:
    return run_args(build_parser(prog).parse_args(argv))

"""Where a CPU-S training step spends the time its convolution floor does not, by sampling: `perf record -e cpu-clock`
on a loop of unetx training steps, then on a loop of the same step's convolutions replayed alone (the floor of
`unetx bench`'s "step / its convolutions", unetx.bench.convs), each in its own process; per symbol, the CPU time per
step in each (summed over the threads: "thread-ms") and the difference.

    python bench/perf_step.py --autocast bfloat16 --threads 2 [--seconds 8] [--top 30] [--layout nchw]

Unlike torch.profiler (bench/profile_step.py), sampling adds no per-call cost, so the many small calls of a step are
not inflated; and it sees inside the ops: which kernel, the threads' idle waits (libgomp: a thread spinning while the
other runs serial work or a longer share), the allocator, the interpreter. It needs `perf` (linux-tools) and
permission to attach to a process. unetx's symbols need an unstripped build:

    pip install --no-build-isolation -Cbuild-dir=build/prof -Ccmake.build-type=RelWithDebInfo -Cinstall.strip=false -e .

(without it, unetx's kernels show as addresses in _C's library). oneDNN's JIT-compiled kernels show as one "JIT"
row. Each process measures its own convolution choices (as `unetx bench`), and the floor's convolutions, run with no
input stage, statistics or gradient folding, are keyed and chosen apart from the step's (forward: no stage rows, no
statistics; weight gradient: no stage), so the two can run different algorithms for the same layer.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _worker(what: str, autocast: str | None, threads: int, layout: str, ready: Path, seconds: float) -> None:
    import dataclasses

    import torch
    from unetx import bench as ub
    from unetx.allocator import keep_freed_memory
    from unetx.bench.convs import conv_replay, record_convs
    from unetx.ops import algo_choice

    torch.set_num_threads(threads)
    keep_freed_memory()
    algo_choice.measure_afresh()
    w = dataclasses.replace(ub.WORKLOADS["CPU-S"], autocast=autocast)
    state, x, target = ub._inputs(w)
    case = ub.Case(w, ub.Form("unetx", layout), "train", state, x, target)
    for _ in range(3):
        case.step()
    fn = case.step
    if what == "floor":
        fn = conv_replay(record_convs(case), torch.device("cpu"))
        for _ in range(3):
            fn()
    ready.write_text("ready")
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    print(f"{(time.perf_counter() - t0) / n:.6f} {n}")


# "overhead period dso [.] symbol" (period: the samples' CPU time in ns, cpu-clock's unit, whatever sampling rate the
# kernel granted); a JIT dso is "[JIT] tid N", the kernel's symbols are marked [k]
_ROW = re.compile(r"\s*[\d.]+%\s+(\d+)\s+(.+?)\s+\[[.k]\]\s+(.*)")


def _symbol(dso: str, sym: str) -> str:
    if dso.startswith("[JIT]"):
        return "[JIT] (oneDNN's generated kernels)"
    if "libgomp" in dso:
        return "libgomp (threads waiting)"
    sym = re.sub(r"0x[0-9a-f]+", "ADDR", sym.strip())
    return f"{os.path.basename(dso)}: {sym}"


def _measure(what: str, a, tmp: Path) -> tuple[dict[str, float], float]:
    """Thread-ms per call by symbol, and the wall time per call, of `what` (step or floor)."""
    ready, data = tmp / f"{what}.ready", tmp / f"{what}.data"
    cmd = [sys.executable, __file__, "--worker", what, "--threads", str(a.threads), "--layout", a.layout]
    cmd += ["--seconds", str(a.seconds + 4), "--ready", str(ready)] + (["--autocast", a.autocast] if a.autocast else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900  # CPU-S's first steps measure their convolution choices: minutes at most
        while not ready.exists():
            if proc.poll() is not None:
                raise SystemExit(f"perf_step: the {what} process exited with {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise SystemExit(f"perf_step: the {what} process was not ready after 900 s")
            time.sleep(0.2)
        time.sleep(1.0)  # past the first calls after the ready mark
        rec = subprocess.run(
            ["perf", "record", "-e", "cpu-clock", "-F", "999", "-p", str(proc.pid), "-o", str(data)]
            + ["--", "sleep", str(a.seconds)],
            capture_output=True,
            text=True,
        )
        if rec.returncode != 0:
            raise SystemExit(f"perf_step: perf record failed ({rec.returncode}): {rec.stderr.strip()[-400:]}")
        out, _ = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0 or not out.strip():
        raise SystemExit(f"perf_step: the {what} process failed ({proc.returncode}) while it was sampled")
    per_call = float(out.strip().splitlines()[-1].split()[0])
    rep = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "-F", "overhead,period,dso,sym", "-g", "none", "--stdio"],
        capture_output=True,
        text=True,
    )
    if rep.returncode != 0:
        raise SystemExit(f"perf_step: perf report failed ({rep.returncode}): {rep.stderr.strip()[-400:]}")
    return parse_report(rep.stdout, a.seconds / per_call), per_call


def parse_report(text: str, calls: float) -> dict[str, float]:
    """`perf report -F overhead,period,dso,sym --stdio` text of a cpu-clock recording -> thread-ms per call by symbol
    (the period's ns over `calls` calls), oneDNN's JIT code and libgomp's waits each folded into one row."""
    table: dict[str, float] = {}
    for line in text.splitlines():
        r = _ROW.match(line)
        if r:
            k = _symbol(r.group(2), r.group(3))
            table[k] = table.get(k, 0.0) + int(r.group(1)) / 1e6 / calls
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--autocast", choices=["bfloat16", "float16"], default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last")
    p.add_argument("--seconds", type=float, default=8.0, help="sampling time per process (default 8)")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--worker", choices=["step", "floor"], help=argparse.SUPPRESS)
    p.add_argument("--ready", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if a.seconds <= 0:
        p.error(f"--seconds must be > 0, got {a.seconds}")
    if a.top < 1:
        p.error(f"--top must be >= 1, got {a.top}")
    if a.worker:
        _worker(a.worker, a.autocast, a.threads, a.layout, a.ready, a.seconds)
        return 0
    if shutil.which("perf") is None:
        print("perf_step: needs `perf` (linux-tools) on PATH", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        floor, t_floor = _measure("floor", a, Path(d))
        step, t_step = _measure("step", a, Path(d))
    print(
        f"## CPU-S unetx eager {a.layout}, {a.autocast or 'float32'}, {a.threads} threads: step {t_step * 1e3:.0f} ms, "
        f"its convolutions alone {t_floor * 1e3:.0f} ms (ratio {t_step / t_floor:.3f}; each the mean over the "
        f"sampled loop, in its own process)"
    )
    print(
        f"thread-ms per call: step {sum(step.values()):.0f}, floor {sum(floor.values()):.0f} "
        f"({a.threads} threads x wall time, less idle)"
    )
    rows = sorted(set(step) | set(floor), key=lambda k: -abs(step.get(k, 0.0) - floor.get(k, 0.0)))
    print(f"{'step':>8} {'floor':>8} {'diff':>8}  symbol (thread-ms per call)")
    for k in rows[: a.top]:
        s, f = step.get(k, 0.0), floor.get(k, 0.0)
        print(f"{s:8.1f} {f:8.1f} {s - f:+8.1f}  {k[:150]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

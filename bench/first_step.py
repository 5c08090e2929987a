"""The first training steps of CPU-S in two fresh processes that share a new, empty measured-choice cache
(python/unetx/ops/algo_choice.py): the first process measures every convolution pass's candidates in its first step,
the second loads the winners and should start at full speed. Prints each process's step times and how many choices
it measured and loaded.

    python bench/first_step.py [--autocast bfloat16] [--threads 2] [--steps 3] [--pairs 1]
    python bench/first_step.py --quick     # batch 1 at 32x32, two steps: a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time


def child(autocast: str | None, threads: int, steps: int, quick: bool) -> None:
    import torch
    import unetx
    from unetx import bench as ub
    from unetx.allocator import keep_freed_memory

    torch.set_num_threads(threads)
    keep_freed_memory()  # as `unetx train` runs
    loaded = len(unetx._C.algo_choices())
    w = dataclasses.replace(ub.WORKLOADS["CPU-S"], autocast=autocast)
    if quick:
        w = dataclasses.replace(w, batch=1, size=32)
    state, x, target = ub._inputs(w)
    case = ub.Case(w, ub.Form("unetx", "channels_last"), "train", state, x, target)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        case.step()
        times.append(time.perf_counter() - t0)
    measured = sum(not d["loaded"] for d in unetx._C.algo_choices())
    print(json.dumps(dict(steps=times, loaded=loaded, measured=measured)))


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--autocast", choices=["bfloat16"], default=None)
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--steps", type=positive, default=3)
    p.add_argument("--pairs", type=positive, default=1, help="repeat with a new empty cache")
    p.add_argument("--quick", action="store_true", help="batch 1 at 32x32, two steps (a smoke test)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.steps = 2
    if a.child:
        child(a.autocast, a.threads, a.steps, a.quick)
        return 0
    args = [sys.executable, __file__, "--child", "--threads", str(a.threads), "--steps", str(a.steps)]
    args += (["--autocast", a.autocast] if a.autocast else []) + (["--quick"] if a.quick else [])
    what = "CPU-S at batch 1, 32x32 (--quick)" if a.quick else "CPU-S"
    print(f"# {what}, unetx channels_last, {a.autocast or 'float32'}, {a.threads} threads: step times (s)")
    print("| pair | process | cache | steps | choices measured | loaded |")
    print("|---|---|---|---|---|---|")
    for pair in range(1, a.pairs + 1):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, UNETX_CACHE_DIR=cache, UNETX_ALGO_CACHE="1")
            for proc, state in ((1, "empty"), (2, "from process 1")):
                r = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
                if r.returncode:
                    sys.stderr.write(r.stderr)
                    return r.returncode
                out = json.loads(r.stdout.strip().splitlines()[-1])
                steps = " / ".join(f"{t:.2f}" for t in out["steps"])
                print(f"| {pair} | {proc} | {state} | {steps} | {out['measured']} | {out['loaded']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

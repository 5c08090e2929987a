"""Can the host run of the CUDA kernels fail? Each mutant below is a deliberate bug of the kind a kernel ships with
(a missing or divergent barrier, a wrong shuffle, an index or bound off, a vector access without its alignment
test), applied to a scratch copy of csrc/, built like tests/cuda_host (plain, ASan+UBSan or TSan) and run against
tests/cuda_host/test_kernels.py. A mutant is caught when the tests fail for the expected reason (the output
matches `expect`); the script exits 1 if any mutant survives.

    python tests/cuda_host/mutants.py [--out build/cuda-host-check/mutants] [--jobs 2] [names...]

Run by `scripts/cuda-host-check mutants` (not in the default steps: ~15 min on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WRONG = r"max error [0-9][0-9.e+-]* of the largest value exceeds"  # check_close's message, not its source line


@dataclass
class Mutant:
    name: str
    path: str
    old: str
    new: str
    sanitize: str  # "", "address,undefined" or "thread"
    select: str  # pytest -k
    expect: str  # regex the failing run's output must match


MUTANTS = [
    Mutant(
        "block_sum: no barrier before shared memory is reused",
        "csrc/cuda/common.cuh",
        "  __syncthreads();  // sm may still be read from a previous call\n",
        "",
        "thread",
        "bn_relu and not pool and float32 and nchw and not wide",
        r"ThreadSanitizer: data race",
    ),
    Mutant(
        "block_sum: no barrier between the warps' writes and thread 0's reads",
        "csrc/cuda/common.cuh",
        "  if (lane == 0) sm[warp] = v;\n  __syncthreads();\n",
        "  if (lane == 0) sm[warp] = v;\n",
        "thread",
        "bn_relu and not pool and float32 and nchw and not wide",
        r"ThreadSanitizer: data race",
    ),
    Mutant(
        "batch_stats_cl_kernel: tree reduction without its barrier",
        "csrc/cuda/batch_stats.cu",
        "        sm_n[ty * bx + tx] = na + nb;\n      }\n      __syncthreads();\n",
        "        sm_n[ty * bx + tx] = na + nb;\n      }\n",
        "thread",
        "conv_bn_relu and channels_last and float32",
        r"ThreadSanitizer: data race",
    ),
    Mutant(
        "block_sum: only half of each warp shuffles (divergent)",
        "csrc/cuda/common.cuh",
        "  v = warp_sum(v);\n  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;\n  __syncthreads();"
        "  // sm may still be read from a previous call",
        "  if (threadIdx.x % kWarp < 16) v = warp_sum(v);\n"
        "  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;\n  __syncthreads();"
        "  // sm may still be read from a previous call",
        "",
        "bn_relu and not pool and float32 and nchw and not wide",
        r"did not take part|deadlock",
    ),
    Mutant(
        "warp_sum: first shuffle distance halved (lanes 16-31 never reach lane 0)",
        "csrc/cuda/common.cuh",
        "  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_down_sync",
        "  for (int o = kWarp / 4; o > 0; o /= 2) v += __shfl_down_sync",
        "",
        "bn_relu and not pool and float32 and nchw",
        WRONG,
    ),
    Mutant(
        "activation_forward_cl_kernel: no bound on the channel group",
        "csrc/cuda/bn_relu.cu",
        "    if (cq >= Cq) continue;  // no barriers in this kernel\n    A m[V], s[V], t[V];\n#pragma unroll\n"
        "    for (int i = 0; i < V; ++i) {\n      m[i] = A(0), s[i] = A(1), t[i] = A(0);",
        "    A m[V], s[V], t[V];\n#pragma unroll\n"
        "    for (int i = 0; i < V; ++i) {\n      m[i] = A(0), s[i] = A(1), t[i] = A(0);",
        "address,undefined",
        "bn_relu and wide and channels_last and float32",
        r"AddressSanitizer|" + WRONG,
    ),
    Mutant(
        "fold_output_grad_planar_kernel: loop bound off by one",
        "csrc/cuda/batch_stats.cu",
        "  for (unsigned int j = blockIdx.x * kThreads + threadIdx.x; j < items; j += gridDim.x * kThreads) {\n"
        "    const int64_t c = d_c",
        "  for (unsigned int j = blockIdx.x * kThreads + threadIdx.x; j <= items; j += gridDim.x * kThreads) {\n"
        "    const int64_t c = d_c",
        "address,undefined",
        "conv_bn_relu and nchw and float32",
        r"AddressSanitizer: heap-buffer-overflow",
    ),
    Mutant(
        "bilinear taps: the second tap not clamped at the edge",
        "csrc/common/upsample2x.h",
        "  i1 = i0 + 1 < in ? i0 + 1 : in - 1;",
        "  i1 = i0 + 1;",
        "address,undefined",
        "upsample_concat and bilinear and float32 and nchw",
        r"AddressSanitizer|" + WRONG,
    ),
    Mutant(
        "vec_ok: 16-byte accesses without the alignment test",
        "csrc/cuda/common.cuh",
        "  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % (static_cast<uintptr_t>(n) * t.element_size())"
        " != 0)\n    return false;\n",
        "",
        "",
        "misaligned",
        r"misaligned vector access",
    ),
]


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "build" / "cuda-host-check" / "mutants"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("names", nargs="*", help="substrings of mutant names to run (default: all)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    tree = out / "tree"
    if tree.exists():
        shutil.rmtree(tree)
    for d in ("csrc", "tests/cuda_host"):
        shutil.copytree(ROOT / d, tree / d)
    py = sys.executable
    runtimes = {"address,undefined": "libasan.so", "thread": "libtsan.so"}
    san_env = {
        "address,undefined": {
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
            "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        },
        "thread": {"TSAN_OPTIONS": f"halt_on_error=1:exitcode=66:suppressions={ROOT}/tests/cuda_host/tsan.supp"},
        "": {},
    }
    selected = [m for m in MUTANTS if not args.names or any(n in m.name for n in args.names)]
    results = []
    for m in selected:
        src = tree / m.path
        original = (ROOT / m.path).read_text()
        assert original.count(m.old) == 1, f"mutant '{m.name}': its text is not (once) in {m.path}; update mutants.py"
        src.write_text(original.replace(m.old, m.new))
        build = out / f"build-{m.sanitize.replace(',', '-') or 'plain'}"
        print(f"--- {m.name} ({m.path}; {m.sanitize or 'plain'} build; -k '{m.select}')", flush=True)
        r = run(
            [
                "cmake",
                "-S",
                str(tree / "tests/cuda_host"),
                "-B",
                str(build),
                "-G",
                "Ninja",
                f"-DPython_EXECUTABLE={py}",
                f"-DUNETX_SANITIZE={m.sanitize}",
            ]
        )
        if r.returncode == 0:
            r = run(["cmake", "--build", str(build), "-j", str(args.jobs)])
        src.write_text(original)
        if r.returncode != 0:
            results.append((m, "build failed", r.stdout[-3000:] + r.stderr[-3000:]))
            print(results[-1][2])
            continue
        env = dict(os.environ, OMP_NUM_THREADS="1", UNETX_CUDA_HOST_BUILD=str(build), **san_env[m.sanitize])
        if m.sanitize:
            env["LD_PRELOAD"] = run(["g++", f"-print-file-name={runtimes[m.sanitize]}"]).stdout.strip()
        env.setdefault("UNETX_EMU_TIMEOUT_S", "60")
        r = run(
            [
                py,
                "-m",
                "pytest",
                str(ROOT / "tests/cuda_host/test_kernels.py"),
                "-q",
                "-s",
                "-x",
                "-p",
                "no:cacheprovider",
                "-k",
                m.select,
            ],
            env=env,
            cwd=ROOT,
        )
        log = r.stdout + r.stderr
        caught = r.returncode != 0 and re.search(m.expect, log) is not None
        why = re.search(m.expect, log)
        verdict = (
            ("caught" if caught else "SURVIVED")
            + f" (exit {r.returncode}"
            + (f": '{why.group(0)[:80]}')" if why else ")")
        )
        results.append((m, verdict, log))
        print(verdict, flush=True)
        if not caught:
            print(log[-4000:])
    print("\nmutant".ljust(72), "result")
    for m, verdict, _ in results:
        print(f"{m.name:70} {verdict}")
    return 0 if all(v.startswith("caught") for _, v, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())

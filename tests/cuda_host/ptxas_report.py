"""nvcc's resource report for unetx's CUDA kernels: registers, shared memory, stack frame and spill bytes per kernel
instantiation for one architecture (default sm_90), from `nvcc -Xptxas -v` on csrc/cuda/*.cu with the extension's
own compile flags. Writes a table; exits 1 if a hot kernel spills registers to local memory (or nvcc fails).

    python tests/cuda_host/ptxas_report.py --out build/cuda-host-check/ptxas-sm_90.txt [--arch 90] [--jobs 2]

Run by scripts/cuda-host-check (step ptxas). Needs nvcc and a torch with its C++ headers; no GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Kernels that touch every element of an activation: a spill there costs local-memory traffic per element. The two
# finishing kernels (one warp per channel over a few partials) are reported but do not gate.
NOT_HOT = {"sum_partials_kernel", "batch_stats_finish_kernel"}
# The same device flags as CMakeLists.txt's CUDA compile options.
NVCC_FLAGS = [
    "-std=c++20",
    "-O3",
    "--expt-relaxed-constexpr",
    "-lineinfo",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-Xcompiler",
    "-fPIC",
]


def compile_one(nvcc: str, src: Path, arch: str, includes: list[str], abi: str) -> tuple[Path, int, str]:
    cmd = [
        nvcc,
        "-c",
        str(src),
        "-o",
        os.devnull,
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-Xptxas",
        "-v",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-DUNETX_WITH_CUDA=1",
        *NVCC_FLAGS,
        f"-I{ROOT / 'csrc'}",
        *[f"-I{i}" for i in includes],
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return src, r.returncode, r.stdout + r.stderr


def demangle(names: list[str]) -> dict[str, str]:
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse(log: str) -> list[dict]:
    """One row per entry function: mangled name, registers, smem, stack, spill stores/loads."""
    rows, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line)
        if m:
            cur = dict(name=m.group(1), regs=0, smem=0, stack=0, spill_st=0, spill_ld=0)
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return rows


def short(demangled: str) -> tuple[str, str]:
    """(kernel name, its template arguments) from a demangled signature."""
    m = re.match(r"(?:void )?(?:[\w:]+::)?(?:\(anonymous namespace\)::)?(\w+)<(.*)>\(", demangled)
    if m:
        return m.group(1), m.group(2)
    m = re.search(r"(\w+)\(", demangled)
    return (m.group(1) if m else demangled), ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="90")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
    )
    if not nvcc:
        print("ptxas report: nvcc not found (put the CUDA toolkit's bin on PATH)", file=sys.stderr)
        return 1
    import torch
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths()
    abi = "1" if torch._C._GLIBCXX_USE_CXX11_ABI else "0"
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda s: compile_one(nvcc, s, args.arch, includes, abi), sources))
    rows, failed = [], False
    for src, rc, log in results:
        if rc != 0:
            print(f"nvcc failed on {src.relative_to(ROOT)}:\n{log[-6000:]}", file=sys.stderr)
            failed = True
        rows += parse(log)
    if failed:
        return 1
    names = demangle([r["name"] for r in rows])
    for r in rows:
        r["kernel"], r["targs"] = short(names[r["name"]])
    rows.sort(key=lambda r: (r["kernel"], r["targs"]))
    lines = [
        f"nvcc -Xptxas -v, sm_{args.arch}, {len(rows)} kernel instantiations ({nvcc})",
        f"{'kernel':34} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st':>8} {'spill ld':>8}  template arguments",
    ]
    for r in rows:
        lines.append(
            f"{r['kernel']:34} {r['regs']:>4} {r['smem']:>6} {r['stack']:>5} {r['spill_st']:>8} "
            f"{r['spill_ld']:>8}  {r['targs']}"
        )
    lines.append("")
    lines.append("per kernel: max registers, max shared memory, max stack frame, spill bytes (stores + loads)")
    spilled = []
    for k in sorted({r["kernel"] for r in rows}):
        rs = [r for r in rows if r["kernel"] == k]
        spill = sum(r["spill_st"] + r["spill_ld"] for r in rs)
        hot = k not in NOT_HOT
        lines.append(
            f"  {k:34} regs {max(r['regs'] for r in rs):>3}  smem {max(r['smem'] for r in rs):>5}  "
            f"stack {max(r['stack'] for r in rs):>4}  spill {spill:>5}  {'hot' if hot else ''}"
        )
        if hot and spill:
            spilled.append(k)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-(len({r["kernel"] for r in rows}) + 1) :]))
    print(f"ptxas report: {args.out}")
    if len({r["kernel"] for r in rows}) < 12:
        print(
            f"ptxas report: expected the 12 unetx kernels, found {sorted({r['kernel'] for r in rows})}", file=sys.stderr
        )
        return 1
    if spilled:
        print(f"ptxas report: local-memory spills in hot kernels: {', '.join(spilled)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

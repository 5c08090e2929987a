"""run(): every form of every task of one workload, measured in one process, as one JSON-able result."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, replace

import torch

from .. import allocator
from .cases import Case, _inputs
from .convs import conv_replay, record_convs
from .flops import gemm_rate, step_flops
from .measure import median, peak_allocated, saved_bytes, time_interleaved
from .workloads import _LAYOUT_LABEL, LAYOUTS, WORKLOADS, BenchConfigError, Form, default_forms

# the CPU features a figure depends on: vector width (AVX2 / AVX-512) and native bfloat16 / float16 arithmetic
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


def machine_info(device: str = "cpu") -> dict:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu == (platform.processor() or platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    info = dict(
        cpu=cpu,
        cores=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        os=f"{platform.system()} {platform.release()}",
        cpu_flags=[f for f in SPEED_FLAGS if f in flags],
        allocator=allocator.describe(),
    )
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    with contextlib.suppress(Exception):
        from ..ops import build_info

        bi = build_info()
        info["unetx_build"] = {k: bi[k] for k in ("compiler", "cuda", "cuda_kernels_enabled") if k in bi}
    return info


def _loadavg() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


def run(
    device: str = "cpu",
    size: int | None = None,
    *,
    workload: str | None = None,
    batch: int | None = None,
    config: dict | None = None,
    autocast: str | None = None,
    compile: bool = False,
    max_autotune: bool = False,
    compile_unetx: bool = False,
    rounds: int = 5,
    threads: int | None = None,
    tasks: tuple[str, ...] = ("train", "eval"),
    log: Callable[[str], None] | None = None,
) -> dict:
    """Measure one workload: every form of every task, memory, the convolution floor, the work per step and the
    machine's GEMM rate. Returns a JSON-able dict
    (see format_table). `workload` names one of WORKLOADS (default: CPU-S on cpu, GPU-L on cuda); size, batch,
    config and autocast override its fields (the result is then named "custom")."""
    if device not in ("cpu", "cuda"):
        raise BenchConfigError(f"unetx bench: device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchConfigError(
            "unetx bench: --device cuda asked for, but torch.cuda.is_available() is False on this "
            "machine; use --device cpu"
        )
    name = workload or ("CPU-S" if device == "cpu" else "GPU-L")
    if name not in WORKLOADS:
        raise BenchConfigError(f"unetx bench: unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    w = replace(WORKLOADS[name], device=device)
    custom = {k: v for k, v in dict(size=size, batch=batch, autocast=autocast).items() if v is not None}
    if config:
        custom["config"] = dict(w.config, **config)
    if custom:
        w = replace(w, name="custom", **custom)
    if w.size % 2 ** w.config["depth"] and log:
        log(f"note: size {w.size} is not a multiple of 2**depth; both models mirror-pad it")
    if threads is not None:
        torch.set_num_threads(threads)
    # many compiled forms of the same module classes; keep dynamo from falling back to eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    say = log or (lambda s: None)
    dev = torch.device(device)
    result: dict = dict(
        workload=w.name,
        description=w.describe(),
        config=asdict(w),
        machine=machine_info(device),
        date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        rounds=rounds,
        loadavg_before=_loadavg(),
        compile=compile,
        tasks={},
        saved={},
        peak={},
        convs={},
    )
    result["machine"]["threads"] = torch.get_num_threads()
    state, x, target = _inputs(w)

    for task in tasks:
        say(f"[{w.name}] {task}: building forms")
        forms = default_forms(task, compile, max_autotune, compile_unetx, device=w.device)
        cases = {f.name: Case(w, f, task, state, x, target) for f in forms}
        fns: dict[str, Callable[[], None]] = {n: c.step for n, c in cases.items()}
        floors = {}
        for lay in LAYOUTS:  # the convolutions alone, in each unetx eager layout
            src = cases.get(Form("unetx", lay).name)
            if src is not None:
                floors[lay] = f"unetx convolutions only {_LAYOUT_LABEL[lay]}"
                fns[floors[lay]] = conv_replay(record_convs(src), dev)
        warm = {n: (2 if c.form.compile else 1) for n, c in cases.items()}
        samples, first = time_interleaved(fns, rounds, warmup=warm, log=say)
        result["tasks"][task] = {
            n: dict(
                median_s=median(s),
                samples=s,
                first_call_s=first[n],
                **({"form": asdict(cases[n].form)} if n in cases else {"floor_of": f"unetx eager {n.split()[-1]}"}),
            )
            for n, s in samples.items()
        }
        result["convs"][task] = {lay: n for lay, n in floors.items()}
        if task == "eval":  # every form computes the same thing: max |difference| to stock eager NCHW, per form
            with torch.no_grad():
                ref = cases[Form("stock", "nchw").name].forward().float()
                for n, c in cases.items():
                    d = (c.forward().float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
                    result["tasks"][task][n]["max_rel_diff_to_stock"] = d
                    if d > (5e-2 if w.autocast else 1e-3):
                        say(f"  WARNING: {n} differs from stock eager NCHW by {d:.3g} of the largest logit")
        if task == "train":
            for n, c in cases.items():
                try:
                    act, tot = saved_bytes(c.forward, c.model.parameters())
                    result["saved"][n] = dict(activations=act, with_parameters=tot)
                except Exception as e:  # a compiled graph may refuse saved-tensor hooks
                    result["saved"][n] = dict(error=f"{type(e).__name__}: {e}"[:200])
                if dev.type == "cuda":
                    result["peak"][n] = peak_allocated(c)
        del cases, fns
    # the work of a step and the GEMM rate of this machine in the step's dtype: achieved GFLOP/s (table.py)
    result["flops"] = {task: step_flops(w, task) for task in tasks}
    say(f"[{w.name}] timing a GEMM in {w.autocast or 'float32'}")
    result["gemm"] = gemm_rate(w.device, w.autocast)
    result["loadavg_after"] = _loadavg()
    return result

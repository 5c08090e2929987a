"""Where one training step's time goes, by category (convolutions, unetx's own ops, the rest), from torch.profiler."""

from __future__ import annotations

import time

import torch

from .cases import Case, _inputs
from .workloads import WORKLOADS, Form, Workload

_CATEGORY_ORDER = (
    "convolution (oneDNN; unetx GEMMs; unetx Winograd with the stage and epilogue it fuses)",
    "unetx ops' own work (kernels, copies)",
    "stock BatchNorm / ReLU / pool / cat / upsample",
    "optimizer (Adam step)",
    "loss",
    "everything else (autograd, Python, zero_grad)",
)
_ELSE = _CATEGORY_ORDER[-1]


def _own_category(name: str) -> str | None:
    if name.startswith("Optimizer.step"):
        return "optimizer (Adam step)"
    if name.startswith("autograd::") or (name.startswith("GeneratedBackwardFor") and name.endswith("Backward")):
        return _ELSE  # autograd's bookkeeping around each node
    # the convolutions unetx computes itself: weight-gradient GEMMs, the transposed 2x2 and 1x1 row GEMMs, and
    # Winograd (which builds the input stage band by band and writes the output's epilogue inside the kernel: not
    # separable from the convolution there)
    if name in ("unetx::weight_grad", "unetx::winograd", "unetx::conv_transpose2x2", "unetx::conv1x1"):
        return _CATEGORY_ORDER[0]
    if name.startswith("unetx::") or name.startswith("GeneratedBackwardFor_unetx"):
        return "unetx ops' own work (kernels, copies)"
    if name.startswith("aten::") and ("conv" in name or name.startswith("aten::mkldnn")):
        return _CATEGORY_ORDER[0]
    if any(k in name for k in ("batch_norm", "threshold", "relu", "clamp", "pool", "aten::cat", "upsample")):
        return "stock BatchNorm / ReLU / pool / cat / upsample"
    if any(k in name for k in ("nll_loss", "log_softmax", "cross_entropy")):
        return "loss"
    return None


def _category(name: str, ancestors: list[str]) -> str:
    """An event's self time goes to the first of itself and its ancestors (nearest first) that names a category:
    a copy inside a convolution is convolution time, a copy inside a unetx op is that op's."""
    for n in [name, *ancestors]:
        c = _own_category(n)
        if c is not None:
            return c
    return _ELSE


def profile_step(
    workload: str | Workload = "CPU-S",
    impl: str = "unetx",
    layout: str = "channels_last",
    task: str = "train",
    top: int = 15,
    threads: int | None = None,
    warmup: int = 2,
) -> dict:
    """torch.profiler on one step of a named workload: wall time, self time per category, top ops by self time.

    unetx's kernels run inside its ops (no separate profiler events): their time is the self time of
    unetx::* (backward) and GeneratedBackwardFor_unetx_*_default (forward) events. Each event's self time is
    attributed to its nearest categorised ancestor (see _category)."""
    from torch.profiler import ProfilerActivity, profile

    if threads is not None:
        torch.set_num_threads(threads)
    w = WORKLOADS[workload] if isinstance(workload, str) else workload
    state, x, target = _inputs(w)
    case = Case(w, Form(impl, layout), task, state, x, target)
    for _ in range(warmup):
        case.step()
    t0 = time.perf_counter()
    case.step()
    unprofiled = time.perf_counter() - t0
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if w.device == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        case.step()
        wall = time.perf_counter() - t0
    cats = dict.fromkeys(_CATEGORY_ORDER, 0.0)
    for e in prof.events():
        anc, p = [], e.cpu_parent
        while p is not None:
            anc.append(p.name)
            p = p.cpu_parent
        cats[_category(e.name, anc)] += e.self_cpu_time_total / 1e3
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    rows = [
        dict(name=e.key, self_ms=e.self_cpu_time_total / 1e3, calls=e.count, total_ms=e.cpu_time_total / 1e3)
        for e in ops[:top]
    ]
    return dict(
        workload=w.name,
        form=Form(impl, layout).name,
        task=task,
        wall_ms=wall * 1e3,
        unprofiled_ms=unprofiled * 1e3,
        self_total_ms=sum(cats.values()),
        categories=cats,
        top=rows,
        threads=torch.get_num_threads(),
    )


def format_profile(p: dict) -> str:
    s = (
        f"**{p['form']}**, one {p['task']} step of {p['workload']}: {p['wall_ms']:.0f} ms under the profiler "
        f"({p['unprofiled_ms']:.0f} ms unprofiled, {p['threads']} threads).\n\n"
        "| Where the time goes | self ms | share |\n|---|---|---|\n"
    )
    tot = p["self_total_ms"] or 1.0
    for k, v in p["categories"].items():
        if v > 0:
            s += f"| {k} | {v:.0f} | {100 * v / tot:.0f}% |\n"
    s += "\n| Top ops by self time | self ms | calls |\n|---|---|---|\n"
    for r in p["top"]:
        s += f"| `{r['name']}` | {r['self_ms']:.1f} | {r['calls']} |\n"
    return s

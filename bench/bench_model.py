"""The whole model, unetx.UNet against the same network in stock PyTorch (unetx.reference.UNet, same weights and
inputs): one training step (forward, cross-entropy, backward, Adam step) and one eval forward (no_grad), on the
named workloads (unetx.bench.WORKLOADS; GPU-L only where CUDA is present). Forms come from
unetx.bench.default_forms: eager NCHW and channels_last for both, torch.compile (with freezing for eval) for
both. Each group also times unetx's convolutions alone (the same ATen
convolution calls replayed), the floor unetx's step can approach.

    pytest bench/bench_model.py --threads 2                     # ~15 min on 2 cores, most of it compiling
    pytest bench/bench_model.py --threads 2 -m "not compile"    # eager forms only
"""

from __future__ import annotations

import pytest
import torch
from unetx import bench

ROUNDS = 3
HAS_CUDA = torch.cuda.is_available()


def _params():
    out = []
    for name, w in bench.WORKLOADS.items():
        for task in ("train", "eval"):
            forms = bench.default_forms(task, compile=True, compile_unetx=True, device=w.device)
            floors = [bench.Form("unetx", lay) for lay in bench.LAYOUTS]
            for form in forms + [("convolutions", f.layout) for f in floors]:
                marks = (
                    [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
                    if w.device == "cuda"
                    else []
                )
                if isinstance(form, bench.Form) and form.compile:
                    marks.append(pytest.mark.compile)
                fid = (
                    form.name
                    if isinstance(form, bench.Form)
                    else f"unetx convolutions only {bench._LAYOUT_LABEL[form[1]]}"
                )
                out.append(pytest.param(name, task, form, marks=marks, id=f"{name}-{task}-{fid.replace(' ', '-')}"))
    return out


@pytest.mark.parametrize("workload, task, form", _params())
def bench_unet(benchmark, workload, task, form):
    w = bench.WORKLOADS[workload]
    state, x, target = bench._inputs(w)
    benchmark.group = f"{workload} {task}: {w.describe()}"
    if isinstance(form, tuple):  # the convolutions of unetx's eager step alone
        src = bench.Case(w, bench.Form("unetx", form[1]), task, state, x, target)
        src.step()
        fn = bench.conv_replay(bench.record_convs(src), torch.device(w.device))
        del src
        benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
        return
    case = bench.Case(w, form, task, state, x, target)
    if task == "train" and form.compile is None:
        act, total = bench.saved_bytes(case.forward, case.model.parameters())
        benchmark.extra_info.update(saved_for_backward_bytes=act, saved_with_parameters_bytes=total)
    if w.device == "cuda":
        case.step()
        benchmark.extra_info["peak_allocated_bytes"] = bench.peak_allocated(case)
    benchmark.pedantic(case.step, rounds=ROUNDS, warmup_rounds=2 if form.compile else 1, iterations=1)

"""Every unetx op, forward and backward, on small CUDA tensors through the compiled CUDA kernels: the workload that
scripts/gpu-check runs under compute-sanitizer (memcheck, racecheck), so it stays small and touches every kernel
path: planar and channels-last layouts, a strided (neither) layout, 16-byte vector and scalar paths (channel counts
and widths that are and are not multiples of 8), odd sizes, every dtype, pooling, both upsampling modes, the
transposed and eval forms of the fused layer, and an empty batch.

Each result is also compared with the float64 reference (unetx.reference) under loose bars, so a kernel that
computes garbage without touching bad memory still fails; the tests (tests/test_*.py) hold the exact accuracy bars.
Exit status 0: all cases ran and matched; 1: a mismatch; the sanitizer's own exit code reports memory errors.

    UNETX_CUDA_KERNELS=1 python3 scripts/cuda_ops_smoke.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 scripts/cuda_ops_smoke.py --small
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("UNETX_CUDA_KERNELS", "1")

import torch
from unetx import ops
from unetx import reference as ref

# max |ours - float64 reference| / max |reference| allowed (loose: this is a smoke test, the tests are the bar)
DEVICE = "cuda"  # --device cpu: the same cases on the CPU kernels (to try this script without a GPU)
BAR = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
failures: list[str] = []


def layout(t: torch.Tensor, name: str) -> torch.Tensor:
    if name == "nchw":
        return t.contiguous()
    if name == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    n, c, h, w = t.shape  # "strided": a channel-strided, width-sliced view of a permuted buffer
    buf = torch.empty(n, w + 2, 2 * c, h, dtype=t.dtype, device=t.device)
    view = buf.permute(0, 2, 3, 1)[:, ::2, :, 1 : w + 1]
    view.copy_(t)
    return view


def randn(*shape, dtype, lay="nchw", mean=0.0, gen=None):
    t = torch.randn(*shape, dtype=torch.float64, generator=gen) + mean
    t = t.to(device=DEVICE, dtype=dtype)
    return (layout(t, lay) if t.dim() == 4 else t).requires_grad_(True)


def vec(c, dtype, gen, lo=None):
    v = (
        torch.rand(c, dtype=torch.float64, generator=gen) + 0.5
        if lo
        else torch.randn(c, dtype=torch.float64, generator=gen)
    )
    return v.to(device=DEVICE, dtype=dtype).requires_grad_(True)


def as_tuple(r):
    return tuple(r) if isinstance(r, (tuple, list)) else (r,)


def check(label: str, dtype, ours_fn, ref_fn, inputs: dict, gen) -> None:
    """ours_fn(**inputs) vs ref_fn(**float64 inputs): outputs and the gradients of every input."""
    try:
        outs = as_tuple(ours_fn(**inputs))
        live = [o for o in outs if o.numel() > 0 and o.requires_grad]
        cots = [torch.randn(o.shape, dtype=torch.float64, generator=gen).to(device=DEVICE, dtype=o.dtype) for o in live]
        names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        grads = torch.autograd.grad(live, [inputs[k] for k in names], cots, allow_unused=True) if live else []
        exact_in = {
            k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
            for k, v in inputs.items()
        }
        exact = as_tuple(ref_fn(**exact_in))
        exact_live = [e for e, o in zip(exact, outs) if o.numel() > 0 and o.requires_grad]
        g_exact = (
            torch.autograd.grad(exact_live, [exact_in[k] for k in names], [c.double() for c in cots], allow_unused=True)
            if live
            else []
        )
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # report and go on: the sanitizer run should see every case
        failures.append(f"{label}: raised {type(e).__name__}: {e}")
        print(f"FAIL {label}: raised {type(e).__name__}: {e}", flush=True)
        return
    worst, what = 0.0, ""
    pairs = [(f"out{i}", o, e) for i, (o, e) in enumerate(zip(outs, exact))]
    pairs += [(f"grad {k}", g, e) for k, g, e in zip(names, grads, g_exact)]
    for name, a, e in pairs:
        if (a is None) != (e is None):
            failures.append(f"{label}: {name}: one side has no value")
            return
        if e is None or e.numel() == 0:
            continue
        if a.shape != e.shape:
            failures.append(f"{label}: {name}: shape {tuple(a.shape)} != {tuple(e.shape)}")
            return
        err = ((a.double() - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
        if not err <= worst:  # also catches NaN
            worst, what = err, name
    ok = worst <= BAR[dtype]
    print(f"{'ok  ' if ok else 'FAIL'} {label}: worst relative error {worst:.2e} ({what})", flush=True)
    if not ok:
        failures.append(f"{label}: {what} relative error {worst:.3g} > {BAR[dtype]:.0e}")


def main() -> int:
    global DEVICE
    if "--device" in sys.argv[1:]:
        DEVICE = sys.argv[sys.argv.index("--device") + 1]
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("cuda_ops_smoke: no CUDA device", file=sys.stderr)
        return 2
    if DEVICE == "cuda" and not ops.cuda_kernels_enabled():
        print(
            "cuda_ops_smoke: the compiled CUDA kernels are not enabled (UNETX_CUDA_KERNELS=1, CUDA build)",
            file=sys.stderr,
        )
        return 2
    small = "--small" in sys.argv[1:]  # under a sanitizer: every kernel path once, fewer repeats of the fused layer
    torch.backends.cudnn.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    layouts = ["nchw", "channels_last", "strided"]
    # (N, C, H, W): C = 16 and W = 16 take the 16-byte paths (8 bf16 / 4 fp32 / 2 fp64 per access), C = 6 / W = 6
    # and the odd sizes take the scalar paths
    shapes = [(2, 16, 8, 16), (2, 6, 6, 6), (1, 3, 5, 7)]
    for dt in dtypes:
        for lay in layouts:
            for n, c, h, w in shapes:
                tag = f"{str(dt)[6:]} {lay} {n}x{c}x{h}x{w}"
                even = h % 2 == 0 and w % 2 == 0
                t = dict(
                    y=randn(n, c, h, w, dtype=dt, lay=lay, mean=0.3, gen=gen),
                    scale=vec(c, dt, gen, lo=True),
                    shift=vec(c, dt, gen),
                    mean=vec(c, dt, gen),
                )
                check(f"bn_relu {tag}", dt, ops.bn_relu, ref.bn_relu, t, gen)
                t0 = {k: v for k, v in t.items() if k != "mean"}
                check(f"bn_relu(no mean) {tag}", dt, ops.bn_relu, ref.bn_relu, t0, gen)
                if even:
                    check(f"bn_relu_pool {tag}", dt, ops.bn_relu_pool, ref.bn_relu_pool, t, gen)
                    check(f"avg_pool2x2 {tag}", dt, ops.avg_pool2x2, ref.avg_pool2x2, dict(x=t["y"]), gen)
                    for mode in ("nearest", "bilinear"):
                        u = dict(skip=t["y"], x=randn(n, c + 1, h // 2, w // 2, dtype=dt, lay=lay, gen=gen))
                        check(
                            f"upsample_concat[{mode}] {tag}",
                            dt,
                            lambda mode=mode, **a: ops.upsample_concat(a["skip"], a["x"], mode),
                            lambda mode=mode, **a: ref.upsample_concat(a["skip"], a["x"], mode),
                            u,
                            gen,
                        )
                u = dict(skip=t["y"], x=randn(n, 2, h, w, dtype=dt, lay=lay, gen=gen))
                check(
                    f"upsample_concat[none] {tag}",
                    dt,
                    lambda **a: ops.upsample_concat(a["skip"], a["x"], "none"),
                    lambda **a: ref.upsample_concat(a["skip"], a["x"], "none"),
                    u,
                    gen,
                )
        # the fused layer: every input-stage form, train and eval, transposed
        if small and dt in (torch.float16, torch.float64):
            continue  # the fused layer's own code is dtype-independent; its kernels ran above in every dtype
        for lay in ("nchw", "channels_last"):
            for n, c, h, w in [(2, 16, 8, 16), (2, 6, 6, 10)]:
                tag = f"{str(dt)[6:]} {lay} {n}x{c}x{h}x{w}"
                g = torch.Generator().manual_seed(1)
                x = randn(n, c, h, w, dtype=dt, lay=lay, mean=0.3, gen=g)
                vs = dict(x_scale=vec(c, dt, g, lo=True), x_shift=vec(c, dt, g), x_mean=vec(c, dt, g))
                wt = lambda co, ci, k=3: (
                    (torch.randn(co, ci, k, k, dtype=torch.float64, generator=g) * (ci * k * k) ** -0.5)
                    .to(device=DEVICE, dtype=dt)
                    .requires_grad_(True)
                )
                forms = {
                    "plain": dict(x=x, weight=wt(8, c)),
                    "act": dict(x=x, weight=wt(8, c), **vs),
                    "act+pool": dict(x=x, weight=wt(8, c), x_pool=True, **vs),
                    "pool-only": dict(x=x, weight=wt(8, c), x_pool=True),
                    "act+x2 nearest": dict(
                        x=x,
                        weight=wt(8, c + 4),
                        x2_mode="nearest",
                        x2=randn(n, 4, h // 2, w // 2, dtype=dt, lay=lay, gen=g),
                        **vs,
                    ),
                    "act+x2 bilinear": dict(
                        x=x,
                        weight=wt(8, c + 4),
                        x2_mode="bilinear",
                        x2=randn(n, 4, h // 2, w // 2, dtype=dt, lay=lay, gen=g),
                        **vs,
                    ),
                    "act+x2 none": dict(
                        x=x, weight=wt(8, c + 3), x2_mode="none", x2=randn(n, 3, h, w, dtype=dt, lay=lay, gen=g), **vs
                    ),
                    "eval relu+bias": dict(x=x, weight=wt(8, c), bias=vec(8, dt, g), stats=False, relu=True, **vs),
                    "transposed": dict(x=x, weight=wt(c, 5, 2), bias=vec(5, dt, g), transposed=True, stats=False, **vs),
                }
                for name, kw in forms.items():
                    tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
                    flags = {k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)}
                    check(
                        f"conv_bn_relu[{name}] {tag}",
                        dt,
                        lambda flags=flags, **a: ops.conv_bn_relu(
                            a["x"],
                            a["weight"],
                            a.get("bias"),
                            **{k: a.get(k) for k in ("x_scale", "x_shift", "x_mean", "x2")},
                            **flags,
                        ),
                        lambda flags=flags, **a: ref.conv_bn_relu(
                            a["x"],
                            a.get("x_scale"),
                            a.get("x_shift"),
                            flags.get("x_pool", False),
                            a.get("x2"),
                            flags.get("x2_mode", "none"),
                            a["weight"],
                            a.get("bias"),
                            flags.get("transposed", False),
                            flags.get("stats", True),
                            flags.get("relu", False),
                            a.get("x_mean"),
                        ),
                        tensors,
                        gen,
                    )
    # an empty batch: nothing to compute, nothing may be touched
    for dt in (torch.float32, torch.bfloat16):
        y = torch.empty(0, 8, 4, 4, device=DEVICE, dtype=dt)
        s = torch.ones(8, device=DEVICE)
        try:
            ops.bn_relu(y, s, s)
            ops.bn_relu_pool(y, s, s)
            ops.avg_pool2x2(y)
            ops.upsample_concat(y, torch.empty(0, 8, 2, 2, device=DEVICE, dtype=dt), "bilinear")
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            print(f"ok   empty batch {dt}")
        except Exception as e:
            failures.append(f"empty batch {dt}: {type(e).__name__}: {e}")
    print(f"\n{len(failures)} failure(s)")
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

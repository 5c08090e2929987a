"""unetx's CUDA kernels (csrc/cuda/*.cu) executed on the host, under the CUDA emulation of csrc/cuda/host_emulation.h,
through the same op layer (csrc/ops.cpp, csrc/conv_bn_relu.cpp) and the same launch code (grids, blocks, vector
widths) a GPU gets: torch.ops.unetx_cuda_host.* on CPU tensors, built by scripts/cuda-host-check (plain, ASan+UBSan,
TSan), which points UNETX_CUDA_HOST_BUILD at the build.

Every op, forward and backward, is compared with unetx.reference (float64; autograd through it for the gradients)
at the CPU tests' tolerances (conftest: TOL for float32/float64; BF16_RATIO x stock PyTorch's error + BF16_FLOOR for
bfloat16, and float16 alike), and with the CPU kernels (torch.ops.unetx.*): same shapes, dtypes and strides, values
within the same tolerance. Each test also checks which kernels ran, with which template arguments (layout, vector
width), so a case cannot silently take another path.
"""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch

_BUILD = os.environ.get("UNETX_CUDA_HOST_BUILD")
if not _BUILD:
    pytest.skip(
        "the host build of the CUDA kernels: run scripts/cuda-host-check (or set UNETX_CUDA_HOST_BUILD)",
        allow_module_level=True,
    )
sys.path.insert(0, _BUILD)
import unetx  # noqa: E402  (torch.ops.unetx: the CPU kernels)
import unetx_cuda_host as host  # noqa: E402
from conftest import (  # noqa: E402
    check_close,
    check_vs_stock,
    dtype_id,
    grads_of,
    leaf,
    max_err,
    rand,
    randn,
    stock_bound,
    to_layout,
)
from unetx import reference as ref  # noqa: E402

HOST = torch.ops.unetx_cuda_host
CPU = torch.ops.unetx
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW = (torch.bfloat16, torch.float16)
dtype_param = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
VEC = {torch.float32: 4, torch.float64: 2, torch.bfloat16: 8, torch.float16: 8}  # 16-byte vectors


@pytest.fixture(autouse=True)
def launches():
    """The kernels a test launched: {signature: count} (signatures carry the template arguments)."""
    host.reset_kernel_launches()
    yield host.kernel_launches


def ran(launches, kernel: str, **targs) -> bool:
    """Whether `kernel` ran with the given template arguments (e.g. V=4, CL="true")."""
    pats = [re.compile(rf"\b{k} = {v}\b") for k, v in targs.items()]
    return any(re.search(rf"\b{kernel}\b", sig) and all(p.search(sig) for p in pats) for sig in launches())


def vec_width(launches, kernel: str) -> set[int]:
    return {int(m.group(1)) for sig in launches() if kernel in sig for m in [re.search(r"\bV = (\d+)", sig)] if m}


def check(ours, cpu, exact, stock, dtype, what):
    """The host-run CUDA kernel's value against the float64 reference at the CPU tests' tolerance, and against the
    CPU kernel's value (same shape, dtype, strides; values within that tolerance)."""
    if exact is None:
        assert ours is None and cpu is None, what
        return
    assert ours is not None and cpu is not None, what
    assert (ours.shape, ours.dtype, ours.stride()) == (cpu.shape, cpu.dtype, cpu.stride()), what
    assert ours.shape == exact.shape, what
    if ours.numel() == 0:
        return
    if dtype in LOW:
        check_vs_stock(ours, stock, exact, what)
        bound = stock_bound(stock, exact)
        diff = max_err(ours, cpu)
        assert diff <= 2 * bound, f"{what}: the host-run CUDA kernel and the CPU kernel differ by {diff}"
    else:
        check_close(ours, exact, dtype, what)
        check_close(ours, cpu.to(torch.float64), dtype, f"{what} (vs the CPU kernel)")


def as_tuple(r):
    return tuple(r) if isinstance(r, (tuple, list)) else (r,)


def cast(args, dtype):
    return [leaf(a.detach().to(dtype)) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def compare_op(op, reference, args, n_diff, dtype, seed=1):
    """op's forward and its backward op on host and CPU against autograd through `reference` (float64, and at dtype
    for the low-precision bound). args[:n_diff] are differentiated (None entries skipped)."""
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    ours = as_tuple(getattr(HOST, op)(*args))
    cpu = as_tuple(getattr(CPU, op)(*args))
    exact_args, stock_args = cast(args, torch.float64), cast(args, dtype)
    exact, stock = as_tuple(reference(*exact_args)), as_tuple(reference(*stock_args))
    for i, (a, b, e, s) in enumerate(zip(ours, cpu, exact, stock)):
        check(a, b, e.detach(), s.detach(), dtype, f"{op} output {i}")
    gen = torch.Generator().manual_seed(seed)
    cots = [randn(*o.shape, gen=gen).to(o.dtype).contiguous(memory_format=unetx.ops.memory_format(o)) for o in ours]
    return ours, cots, exact_args, stock_args, exact, stock


# ------------------------------------------------------------------------------------------ the activation ops
# bn_relu / bn_relu_pool / avg_pool2x2 and their backward: activation_forward_{planar,cl}_kernel,
# activation_backward_{planar,cl}_kernel, sum_partials_kernel.
ACT_SHAPES = {
    "vector": (2, 8, 6, 16),  # W, W / 2 and C multiples of every dtype's vector width: 16-byte accesses
    "odd": (3, 5, 6, 10),  # odd channel count, pooled width 5: scalar accesses
    "wide": (2, 33, 10, 14),  # more items than the grid's threads (grid-stride loops); 33 channels: a half-empty
    # channel group in channels-last blocks (threads past the last channel)
}
ACT_ODD_NOPOOL = (1, 3, 5, 7)  # odd height and width (bn_relu only)


def act_inputs(shape, dtype, layout, with_mean, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    vec_dtype = torch.float32 if dtype in LOW else dtype  # autocast: float32 BatchNorm vectors with half data
    offs = randn(c, gen=gen)
    y = to_layout((randn(n, c, h, w, gen=gen) + offs.view(1, -1, 1, 1)).to(dtype), layout)
    scale = rand(c, dtype=vec_dtype, gen=gen)
    shift = randn(c, std=0.5, dtype=vec_dtype, gen=gen)
    mean = (offs + 0.1 * randn(c, gen=gen)).to(vec_dtype) if with_mean else None
    return y, scale, shift, mean


def expected_kernels(launches, layout, shape, dtype, pool, reduce=True):
    """The activation kernels of the layout ran, 16-byte wide where the inner extent (planar: the output's width;
    channels-last: the channels) is a multiple of the vector width, scalar otherwise."""
    cl = layout == "channels_last"
    suffix = "cl_kernel" if cl else "planar_kernel"
    for kernel in ("activation_forward_" + suffix, "activation_backward_" + suffix):
        assert ran(launches, kernel), launches()
    if reduce:
        assert ran(launches, "sum_partials_kernel"), launches()
    if layout == "strided":
        return  # copied to a dense layout first, whichever suggest_memory_format picks
    n, c, h, w = shape
    inner = c if cl else (w // 2 if pool else w)
    v = VEC[dtype] if inner % VEC[dtype] == 0 else 1
    assert vec_width(launches, "activation_forward_" + suffix) == {v}, launches()


@dtype_param
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [*ACT_SHAPES.values(), ACT_ODD_NOPOOL], ids=[*ACT_SHAPES, "odd-hw"])
@pytest.mark.parametrize("with_mean", [True, False], ids=["mean", "no-mean"])
def test_bn_relu(with_mean, shape, layout, dtype, launches):
    y, s, t, m = act_inputs(shape, dtype, layout, with_mean)
    (z,), (g,), exact_args, stock_args, exact, stock = compare_op("bn_relu", ref.bn_relu, [y, s, t, m], 4, dtype)
    ours = HOST.bn_relu_backward(g, y, s, t, m)
    cpu = CPU.bn_relu_backward(g, y, s, t, m)
    names = ["y", "scale", "shift", "mean"]
    ge = grads_of(exact, [g], exact_args)
    gs = grads_of(stock, [g], stock_args)
    for k, a, b, e, st in zip(names, ours, cpu, ge, gs):
        check(a, b, e, st, dtype, f"bn_relu grad {k}")
    expected_kernels(launches, layout, shape, dtype, pool=False)


@dtype_param
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape", list(ACT_SHAPES.values()), ids=list(ACT_SHAPES))
@pytest.mark.parametrize("with_mean", [True, False], ids=["mean", "no-mean"])
def test_bn_relu_pool(with_mean, shape, layout, dtype, launches):
    y, s, t, m = act_inputs(shape, dtype, layout, with_mean)
    (z, p), (gz, gp), exact_args, stock_args, exact, stock = compare_op(
        "bn_relu_pool", ref.bn_relu_pool, [y, s, t, m], 4, dtype
    )
    ours = HOST.bn_relu_pool_backward(gz, gp, y, s, t, m)
    cpu = CPU.bn_relu_pool_backward(gz, gp, y, s, t, m)
    ge = grads_of(exact, [gz, gp], exact_args)
    gs = grads_of(stock, [gz, gp], stock_args)
    for k, a, b, e, st in zip(["y", "scale", "shift", "mean"], ours, cpu, ge, gs):
        check(a, b, e, st, dtype, f"bn_relu_pool grad {k}")
    expected_kernels(launches, layout, shape, dtype, pool=True)
    assert ran(
        launches,
        "activation_forward_" + ("cl" if layout == "channels_last" else "planar") + "_kernel",
        POOL="true",
        ACT="true",
    )


@dtype_param
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape", list(ACT_SHAPES.values()), ids=list(ACT_SHAPES))
def test_avg_pool2x2(shape, layout, dtype, launches):
    x, *_ = act_inputs(shape, dtype, layout, False)
    (p,), (g,), exact_args, stock_args, exact, stock = compare_op("avg_pool2x2", ref.avg_pool2x2, [x], 1, dtype)
    ours, cpu = HOST.avg_pool2x2_backward(g), CPU.avg_pool2x2_backward(g)
    check(
        ours, cpu, grads_of(exact, [g], exact_args)[0], grads_of(stock, [g], stock_args)[0], dtype, "avg_pool2x2 grad"
    )
    # no normalisation: the kernels' ACT = false variants, and nothing to reduce
    expected_kernels(launches, layout, shape, dtype, pool=True, reduce=False)
    assert not ran(launches, "sum_partials_kernel")
    assert not ran(launches, "activation_forward_planar_kernel", ACT="true")


# ------------------------------------------------------------------------------------------ upsample_concat
# upsample_forward_kernel / upsample_backward_kernel, writing into and reading from channel slices of the
# concatenation buffer (strided tensors: the slice's channel stride is the buffer's).
UP_SHAPES = {  # (N, skip channels, x channels, x height, x width)
    "vector": (2, 8, 8, 3, 4),  # slice offset and widths multiples of every vector width
    "odd": (1, 3, 5, 3, 5),  # scalar accesses, odd sizes
    "slice-offset": (2, 4, 8, 2, 4),  # the slice starts 4 channels in: 16-byte aligned for float32 only
    "one-pixel": (2, 5, 3, 1, 1),  # a 1x1 input: every tap clamps
}


@dtype_param
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape", list(UP_SHAPES.values()), ids=list(UP_SHAPES))
@pytest.mark.parametrize("mode", ["nearest", "bilinear", "none"])
def test_upsample_concat(mode, shape, layout, dtype, launches):
    gen = torch.Generator().manual_seed(2)
    n, cs, cx, h, w = shape
    f = 1 if mode == "none" else 2
    skip = to_layout(randn(n, cs, f * h, f * w, gen=gen).to(dtype), layout)
    x = to_layout(randn(n, cx, h, w, gen=gen).to(dtype), layout)
    reference = lambda skip, x, mode: ref.upsample_concat(skip, x, mode)
    (out,), (g,), exact_args, stock_args, exact, stock = compare_op(
        "upsample_concat", reference, [skip, x, mode], 2, dtype
    )
    ours, cpu = HOST.upsample_concat_backward(g, cs, mode), CPU.upsample_concat_backward(g, cs, mode)
    ge, gs = grads_of(exact, [g], exact_args[:2]), grads_of(stock, [g], stock_args[:2])
    for k, a, b, e, st in zip(["skip", "x"], ours, cpu, ge, gs):
        check(a, b, e, st, dtype, f"upsample_concat grad {k}")
    if mode == "none":
        assert not launches()  # plain copies
        return
    cl = layout == "channels_last"
    for kernel in ("upsample_forward_kernel", "upsample_backward_kernel"):
        assert ran(launches, kernel, CL=str(cl).lower(), BILINEAR=str(mode == "bilinear").lower()), launches()
    v = VEC[dtype]
    aligned = (cs * torch.finfo(dtype).bits // 8) % 16 == 0
    if shape in (UP_SHAPES["vector"], UP_SHAPES["slice-offset"]) and layout != "strided" and (aligned or not cl):
        assert vec_width(launches, "upsample_forward_kernel") == {v}
    if shape == UP_SHAPES["odd"] and (cl or dtype != torch.float64):  # (a width of 10 takes float64's pairs)
        assert vec_width(launches, "upsample_forward_kernel") == {1}
    if shape == UP_SHAPES["slice-offset"] and cl and not aligned:
        assert vec_width(launches, "upsample_forward_kernel") == {1}  # a misaligned slice falls back to scalar


@pytest.mark.parametrize("shape", [(2, 6, 7, 8), (2, 6, 8, 7)], ids=["odd-h", "odd-w"])
def test_upsample_concat_backward_refuses_an_odd_gradient(shape):
    """The op layer's check for every device (the CUDA copy had it, the CPU one did not)."""
    for ops in (HOST, CPU):
        with pytest.raises(RuntimeError, match=r"must have an even height and width for 2x upsampling"):
            ops.upsample_concat_backward(torch.zeros(shape), 3, "nearest")


# ------------------------------------------------------------------------------------------ conv_bn_relu
# The fused layer over the CUDA kernel table: the input stage (activation into a channel slice of the staged input,
# upsampling into the other slice), batch_stats_{planar,cl}_kernel + batch_stats_finish_kernel, and in backward
# fold_output_grad_{planar,cl}_kernel and the input stage's backward from slices of the convolution's input gradient.
CONV_CASES = {
    # name: (x shape, x2 shape or None, x2 mode, weight shape, transposed, pool, scale, mean, stats, relu)
    "pool-concat-stats": ((2, 8, 8, 12), (2, 8, 2, 3), "nearest", (16, 16, 3, 3), False, True, True, True, True, False),
    "odd-bilinear-stats": (
        (1, 5, 6, 6),
        (1, 3, 3, 3),
        "bilinear",
        (7, 8, 3, 3),
        False,
        False,
        True,
        False,
        True,
        False,
    ),
    "eval-relu": ((2, 4, 6, 8), None, "none", (8, 4, 3, 3), False, False, False, False, False, True),
    "transposed-stats": ((2, 8, 3, 4), None, "none", (8, 4, 2, 2), True, False, True, True, True, False),
}


def conv_reference(x, x_scale, x_shift, x_pool, x2, x2_mode, weight, bias, transposed, stats, relu, x_mean):
    return ref.conv_bn_relu(x, x_scale, x_shift, x_pool, x2, x2_mode, weight, bias, transposed, stats, relu, x_mean)


@dtype_param
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_bn_relu(case, layout, dtype, launches):
    xs, x2s, mode, ws, transposed, pool, with_scale, with_mean, stats, relu = CONV_CASES[case]
    gen = torch.Generator().manual_seed(3)
    vec_dtype = torch.float32 if dtype in LOW else dtype
    c = xs[1]
    x = to_layout(randn(*xs, gen=gen).to(dtype), layout)
    x2 = to_layout(randn(*x2s, gen=gen).to(dtype), layout) if x2s else None
    weight = (randn(*ws, gen=gen) / (ws[1 if not transposed else 0] * ws[2] * ws[3]) ** 0.5).to(dtype)
    if layout == "channels_last":
        weight = weight.contiguous(memory_format=torch.channels_last)
    scale = rand(c, dtype=vec_dtype, gen=gen) if with_scale else None
    shift = randn(c, std=0.5, dtype=vec_dtype, gen=gen) if with_scale else None
    mean = randn(c, std=0.3, dtype=vec_dtype, gen=gen) if with_mean else None
    args = [x, scale, shift, pool, x2, mode, weight, None, transposed, stats, relu, mean]
    (y, bm, bv), cots, exact_args, stock_args, exact, stock = compare_op("conv_bn_relu", conv_reference, args, 0, dtype)
    gy = cots[0]
    gm = randn(bm.shape[0], gen=gen).to(bm.dtype) if stats else None
    gv = randn(bv.shape[0], gen=gen).to(bv.dtype) if stats else None
    bw = [
        gy,
        gm,
        gv,
        x,
        scale,
        shift,
        pool,
        x2,
        mode,
        weight,
        False,
        transposed,
        y if stats or relu else y[:0],
        bm,
        relu,
        [True, True, True, True],
        mean,
    ]
    ours, cpu = HOST.conv_bn_relu_backward(*bw), CPU.conv_bn_relu_backward(*bw)
    names = ["x", "x_scale", "x_shift", "x2", "weight", "bias", "x_mean"]
    idx = {"x": 0, "x_scale": 1, "x_shift": 2, "x2": 4, "weight": 6, "bias": 7, "x_mean": 11}
    outs_cots = [(o, c_) for o, c_ in zip(exact, [gy, gm, gv]) if c_ is not None]
    ge = grads_of([o for o, _ in outs_cots], [c_ for _, c_ in outs_cots], [exact_args[idx[k]] for k in names])
    so = [o for o, c_ in zip(stock, [gy, gm, gv]) if c_ is not None]
    gs = grads_of(so, [c_ for c_ in [gy, gm, gv] if c_ is not None], [stock_args[idx[k]] for k in names])
    for k, a, b, e, st in zip(names, ours, cpu, ge, gs):
        check(a, b, e, st, dtype, f"conv_bn_relu grad {k}")
    suffix = "cl_kernel" if layout == "channels_last" else "planar_kernel"
    if stats:
        assert ran(launches, "batch_stats_" + suffix) and ran(launches, "batch_stats_finish_kernel"), launches()
    if stats or relu:
        assert ran(launches, "fold_output_grad_" + suffix), launches()
    if with_scale or pool:
        assert ran(launches, "activation_forward_" + suffix) and ran(launches, "activation_backward_" + suffix)
    if x2 is not None:
        assert ran(launches, "upsample_forward_kernel") and ran(launches, "upsample_backward_kernel")


# ------------------------------------------------------------------------------------------ many blocks
@pytest.mark.parametrize("sms", [1, 16], ids=["1-sm", "16-sms"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_reductions_over_many_blocks(layout, sms, launches, monkeypatch):
    """With more multiprocessors the host code splits each channel's reduction over several blocks (partials
    combined by sum_partials_kernel / batch_stats_finish_kernel): the same results."""
    monkeypatch.setenv("UNETX_EMU_SMS", str(sms))
    y, s, t, m = act_inputs((2, 3, 16, 20), torch.float32, layout, True, seed=4)
    _, (g,), exact_args, _, exact, _ = compare_op("bn_relu", ref.bn_relu, [y, s, t, m], 4, torch.float32)
    ge = grads_of(exact, [g], exact_args)
    for k, a, b, e in zip(
        ["y", "scale", "shift", "mean"], HOST.bn_relu_backward(g, y, s, t, m), CPU.bn_relu_backward(g, y, s, t, m), ge
    ):
        check(a, b, e, None, torch.float32, f"grad {k}")
    w = randn(5, 3, 3, 3).contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
    )
    compare_op(
        "conv_bn_relu", conv_reference, [y, s, t, False, None, "none", w, None, False, True, False, m], 0, torch.float32
    )
    assert ran(launches, "sum_partials_kernel") and ran(launches, "batch_stats_finish_kernel")


def test_every_cuda_kernel_is_covered():
    """The 12 __global__ kernels of csrc/cuda/ are the ones this file's tests check by name."""
    root = os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "cuda")
    kernels = set()
    for name in os.listdir(root):
        if name.endswith(".cu"):
            with open(os.path.join(root, name)) as f:
                src = f.read()
            kernels |= set(re.findall(r"__global__ void __launch_bounds__\(\w+\)\s+(\w+)\(", src))
    with open(__file__) as f:
        checked = set(re.findall(r"\b(\w+_kernel)\b", f.read()))
    checked |= {
        f"{p}_{s}"
        for p in ("activation_forward", "activation_backward", "batch_stats", "fold_output_grad")
        for s in ("planar_kernel", "cl_kernel")
    }
    assert len(kernels) == 12 and kernels <= checked, sorted(kernels - checked)


def offset_by_one(t: torch.Tensor) -> torch.Tensor:
    """t's values in a dense tensor of t's layout whose data starts one element into its storage: no 16-byte
    alignment, whatever the strides."""
    fmt = unetx.ops.memory_format(t)
    like = t.contiguous(memory_format=fmt)
    buf = torch.empty(like.numel() + 1, dtype=t.dtype)
    out = buf[1:].as_strided(like.shape, like.stride())
    out.copy_(t)
    assert out.data_ptr() % 16 != 0 and out.is_contiguous(memory_format=fmt)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_misaligned_inputs_take_the_scalar_path(layout, dtype, launches):
    """Dense inputs whose data is not 16-byte aligned (a view one element into its storage): the host code must
    choose scalar accesses (the emulation asserts every 16-byte access is aligned), with the same results."""
    y, s, t, m = act_inputs(ACT_SHAPES["vector"], dtype, layout, True)
    compare_op("bn_relu_pool", ref.bn_relu_pool, [offset_by_one(y), s, t, m], 4, dtype)
    assert vec_width(
        launches, "activation_forward_" + ("cl" if layout == "channels_last" else "planar") + "_kernel"
    ) == {1}
    host.reset_kernel_launches()
    gen = torch.Generator().manual_seed(6)
    skip = to_layout(randn(2, 8, 6, 8, gen=gen).to(dtype), layout)
    x = offset_by_one(to_layout(randn(2, 8, 3, 4, gen=gen).to(dtype), layout))
    compare_op(
        "upsample_concat", lambda skip, x, mode: ref.upsample_concat(skip, x, mode), [skip, x, "bilinear"], 2, dtype
    )
    if layout == "channels_last":  # planar reads x element by element anyway
        assert vec_width(launches, "upsample_forward_kernel") == {1}

"""unetx.ops.bn_relu and unetx.ops.bn_relu_pool (csrc/cpu/bn_relu.cpp) against unetx.reference.bn_relu /
bn_relu_pool: relu((y - mean) * scale + shift), and that with its 2x2 average pool, in one pass.

Outputs and the gradients of y, scale, shift and mean by autograd through the reference (stock ops); the
stock-PyTorch fallback (ops.FALLBACKS); opcheck and float64 gradcheck.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    cast_inputs,
    check_against_reference,
    check_close,
    check_vs_stock,
    device_param,
    dtype_param,
    grads_of,
    layout_param,
    leaf,
    max_err,
    rand,
    randn,
    scale_of,
    stock_bound,
    to_layout,
)
from unetx import ops
from unetx import reference as ref

# (N, C, H, W): odd channel counts, batch 1, odd spatial sizes where the op allows them
SHAPES = {
    "bn_relu": [(2, 3, 7, 9), (1, 5, 4, 6), (3, 7, 1, 5)],
    "bn_relu_pool": [(2, 3, 8, 10), (1, 5, 6, 4), (2, 7, 2, 2)],
}
OPS = {"bn_relu": (ops.bn_relu, ref.bn_relu), "bn_relu_pool": (ops.bn_relu_pool, ref.bn_relu_pool)}


def make_inputs(shape, dtype, device, layout, with_mean=True, vec_dtype=None, mean_offset=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vec_dtype = vec_dtype or dtype
    n, c, h, w = shape
    offs = randn(c, gen=gen).sign() * mean_offset + randn(c, gen=gen)
    y = randn(n, c, h, w, gen=gen) + offs.view(1, -1, 1, 1)
    inputs = dict(
        y=to_layout(y.to(device=device, dtype=dtype), layout),
        scale=rand(c, dtype=vec_dtype, device=device, gen=gen),
        shift=randn(c, std=0.5, dtype=vec_dtype, device=device, gen=gen),
        mean=(offs + 0.1 * randn(c, gen=gen)).to(device=device, dtype=vec_dtype) if with_mean else None,
    )
    return {k: leaf(v) for k, v in inputs.items()}


@device_param
@dtype_param
@layout_param
@pytest.mark.parametrize("with_mean", [True, False], ids=["mean", "no-mean"])
@pytest.mark.parametrize("shape_index", [0, 1, 2])
@pytest.mark.parametrize("op_name", list(OPS))
def test_matches_reference(op_name, shape_index, with_mean, layout, dtype, device):
    op, reference = OPS[op_name]
    inputs = make_inputs(SHAPES[op_name][shape_index], dtype, device, layout, with_mean)
    ours, _ = check_against_reference(op, reference, inputs, dtype)
    fmt = ops.memory_format(inputs["y"])
    assert all(o.is_contiguous(memory_format=fmt) for o in ours)  # the input's layout is kept


@device_param
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("op_name", list(OPS))
def test_bfloat16_data_with_float32_vectors(op_name, layout, device):
    """Autocast: y in bfloat16, scale/shift/mean (from BatchNorm's float32 statistics) in float32. The output is
    bfloat16; the vectors' gradients float32."""
    op, reference = OPS[op_name]
    inputs = make_inputs(SHAPES[op_name][0], torch.bfloat16, device, layout, vec_dtype=torch.float32)
    check_against_reference(op, reference, inputs, torch.bfloat16)


@device_param
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("op_name", list(OPS))
def test_large_channel_means_keep_float32_gradients_exact(op_name, layout, device):
    """|mean| ~ 100 x std: grad scale = sum(g * (y - mean)) is accumulated centred; within 2x stock float32
    PyTorch's error (which centres elementwise) + 5e-7, where the uncentred sum(g*y) - mean*sum(g) is not."""
    op, reference = OPS[op_name]
    inputs = make_inputs((4, 5, 16, 16), torch.float32, device, layout, mean_offset=100.0, seed=1)
    assert inputs["mean"].abs().min() > 50
    gen = torch.Generator().manual_seed(5)
    ours = op(**inputs)
    ours = ours if isinstance(ours, tuple) else (ours,)
    cots = [randn(*o.shape, gen=gen).to(device) for o in ours]
    names = ["y", "scale", "shift", "mean"]
    exact_in, stock_in = cast_inputs(inputs, torch.float64), cast_inputs(inputs, torch.float32)
    exact, stock = reference(**exact_in), reference(**stock_in)
    exact, stock = (exact, stock) if isinstance(exact, tuple) else ((exact,), (stock,))
    g_ours = grads_of(ours, cots, [inputs[k] for k in names])
    g_exact = grads_of(exact, cots, [exact_in[k] for k in names])
    g_stock = grads_of(stock, cots, [stock_in[k] for k in names])
    floor = 5e-7
    for k, a, s, e in zip(names, g_ours, g_stock, g_exact):
        check_vs_stock(a, s, e, f"grad {k}", floor=floor)
    # the uncentred formula (what centring replaced) must break the same bound: the test can see the regression
    y, m, s, t = (inputs[k].detach() for k in names)
    g = torch.zeros_like(y)
    for o, c in zip(ours, cots):
        g += c if o.shape == y.shape else ref._pool_backward(c)
    g = torch.where((y - m.view(1, -1, 1, 1)) * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1) > 0, g, 0)
    uncentred = (g * y).sum((0, 2, 3)) - m * g.sum((0, 2, 3))
    assert max_err(uncentred, g_exact[1]) > stock_bound(g_stock[1], g_exact[1], floor=floor)


# ---------------------------------------------------------------------------------------------- fallback
@pytest.mark.filterwarnings("ignore:unetx. no unetx kernels")
@pytest.mark.parametrize(
    "dtype,vec_dtype",
    [(torch.float64, None), (torch.float32, None), (torch.bfloat16, torch.float32)],
    ids=["f64", "f32", "bf16-f32vec"],
)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("with_mean", [True, False], ids=["mean", "no-mean"])
@pytest.mark.parametrize("op_name", list(OPS))
def test_fallback_matches_reference_and_kernel(op_name, with_mean, layout, dtype, vec_dtype):
    """ops.FALLBACKS (CUDA/MPS/XPU without unetx kernels), called directly on CPU tensors: reference values, and
    the CPU kernel's shapes, dtypes and strides (both must match one fake impl)."""
    inputs = make_inputs(SHAPES[op_name][0], dtype, "cpu", layout, with_mean, vec_dtype)
    d = {k: None if v is None else v.detach() for k, v in inputs.items()}
    args = (d["y"], d["scale"], d["shift"], d["mean"])
    fb = ops.FALLBACKS[op_name](*args)
    kernel = getattr(torch.ops.unetx, op_name)(*args)
    fb, kernel = (fb, kernel) if isinstance(fb, tuple) else ((fb,), (kernel,))
    exact = OPS[op_name][1](**cast_inputs(d, torch.float64))
    exact = exact if isinstance(exact, tuple) else (exact,)
    for a, b, e in zip(fb, kernel, exact):
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())
        if dtype == torch.bfloat16:
            assert max_err(a, e) <= 2 * max_err(b, e) + 1e-3 * scale_of(e)
        else:
            check_close(a, e, dtype)
    gen = torch.Generator().manual_seed(1)
    grads = [randn(*o.shape, gen=gen).to(dtype).contiguous(memory_format=ops.memory_format(o)) for o in kernel]
    bw_args = (*grads, *args)
    g_fb = ops.FALLBACKS[op_name + "_backward"](*bw_args)
    g_kernel = getattr(torch.ops.unetx, op_name + "_backward")(*bw_args)
    for k, a, b in zip(["y", "scale", "shift", "mean"], g_fb, g_kernel):
        assert (a is None) == (b is None) == (k == "mean" and not with_mean), k
        if a is None:
            continue
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride()), k
        if dtype == torch.bfloat16:
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * scale_of(b), msg=k)
        else:
            check_close(a, b, dtype, f"grad {k}")


# ------------------------------------------------------------------------------------ opcheck / gradcheck
@device_param
@pytest.mark.parametrize(
    "layout,requires_grad",
    [("nchw", True), ("nchw", False), ("channels_last", True), ("strided", True)],
    ids=["nchw-grad", "nchw-nograd", "channels_last-grad", "strided-grad"],
)
@pytest.mark.parametrize("with_mean", [True, False], ids=["mean", "no-mean"])
@pytest.mark.parametrize("op_name", list(OPS))
def test_opcheck(op_name, with_mean, layout, requires_grad, device):
    inputs = make_inputs(SHAPES[op_name][1], torch.float32, device, layout, with_mean)
    args = tuple(leaf(inputs[k], requires_grad) for k in ("y", "scale", "shift", "mean"))
    op = getattr(torch.ops.unetx, op_name).default
    torch.library.opcheck(op, args[:3] if not with_mean else args)
    outs = op(*[a.detach() if a is not None else None for a in args])
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = tuple(torch.randn_like(o) for o in outs)
    bw = getattr(torch.ops.unetx, op_name + "_backward").default
    torch.library.opcheck(
        bw,
        (*grads, *[a.detach() if a is not None else None for a in args]),
        test_utils=("test_schema", "test_faketensor"),
    )


@device_param
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("with_mean", [True, False], ids=["mean", "no-mean"])
@pytest.mark.parametrize("op_name", list(OPS))
def test_gradcheck_float64(op_name, with_mean, layout, device):
    shape = (2, 3, 4, 4) if op_name == "bn_relu_pool" else (2, 3, 3, 3)
    inputs = make_inputs(shape, torch.float64, device, layout, with_mean, seed=3)
    args = [inputs[k] for k in ("y", "scale", "shift", "mean") if inputs[k] is not None]
    # every Jacobian entry for NCHW; a random projection of it for channels_last (same math, other kernel loops)
    assert torch.autograd.gradcheck(
        getattr(ops, op_name), args, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=layout == "channels_last"
    )

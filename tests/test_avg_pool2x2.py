"""unetx.ops.avg_pool2x2 (csrc/cpu/avg_pool2x2.cpp) against unetx.reference.avg_pool2x2 (F.avg_pool2d(x, 2)):
output and input gradient by autograd through the reference, the stock-PyTorch fallback, opcheck, gradcheck."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    check_against_reference,
    check_close,
    device_param,
    dtype_param,
    layout_param,
    leaf,
    randn,
    to_layout,
)
from unetx import ops
from unetx import reference as ref

SHAPES = [(2, 3, 8, 10), (1, 5, 6, 4), (3, 7, 2, 2), (2, 1, 4, 6)]


def make_x(shape, dtype, device, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return leaf(to_layout(randn(*shape, gen=gen, dtype=dtype, device=device), layout))


@device_param
@dtype_param
@layout_param
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, layout, dtype, device):
    x = make_x(shape, dtype, device, layout)
    (p,), _ = check_against_reference(ops.avg_pool2x2, ref.avg_pool2x2, dict(x=x), dtype)
    assert p.is_contiguous(memory_format=ops.memory_format(x))


@pytest.mark.filterwarnings("ignore:unetx. no unetx kernels")
@dtype_param
@layout_param
def test_fallback_matches_reference_and_kernel(layout, dtype):
    x = make_x(SHAPES[0], dtype, "cpu", layout).detach()
    fb, kernel = ops.FALLBACKS["avg_pool2x2"](x), torch.ops.unetx.avg_pool2x2(x)
    assert (fb.shape, fb.dtype, fb.stride()) == (kernel.shape, kernel.dtype, kernel.stride())
    g = torch.randn_like(kernel)
    g_fb, g_kernel = ops.FALLBACKS["avg_pool2x2_backward"](g), torch.ops.unetx.avg_pool2x2_backward(g)
    assert (g_fb.shape, g_fb.dtype, g_fb.stride()) == (g_kernel.shape, g_kernel.dtype, g_kernel.stride())
    if dtype == torch.bfloat16:  # a sum of four bf16 values, rounded once by both
        torch.testing.assert_close(fb, kernel, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(g_fb, g_kernel, rtol=0, atol=0)
    else:
        check_close(fb, ref.avg_pool2x2(x.double()), dtype)
        check_close(g_fb, g_kernel, dtype)


@device_param
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@layout_param
def test_opcheck(layout, requires_grad, device):
    x = leaf(make_x(SHAPES[1], torch.float32, device, layout), requires_grad)
    torch.library.opcheck(torch.ops.unetx.avg_pool2x2.default, (x,))
    g = to_layout(randn(1, 5, 3, 2, device=device), layout)
    torch.library.opcheck(
        torch.ops.unetx.avg_pool2x2_backward.default, (g,), test_utils=("test_schema", "test_faketensor")
    )


@device_param
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck_float64(layout, device):
    x = make_x((2, 3, 2, 4), torch.float64, device, layout, seed=1)
    assert torch.autograd.gradcheck(ops.avg_pool2x2, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)

"""unetx.ops.upsample_concat (csrc/cpu/upsample_concat.cpp) against unetx.reference.upsample_concat:
cat([skip, upsample2x(x)], dim=1) for modes none / nearest / bilinear (align_corners=False). Output and the
gradients of skip and x by autograd through the reference, the stock-PyTorch fallback, opcheck, gradcheck."""

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
    max_err,
    randn,
    scale_of,
    to_layout,
)
from unetx import ops
from unetx import reference as ref

MODES = ["none", "nearest", "bilinear"]
# (N, skip channels, x channels, x height, x width): odd channels, batch 1, odd low-resolution sizes, 1x1
SHAPES = [(2, 3, 5, 4, 5), (1, 7, 3, 3, 7), (2, 5, 1, 1, 1), (3, 1, 2, 5, 2)]


def make_inputs(shape, mode, dtype, device, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, cs, cx, h, w = shape
    f = 1 if mode == "none" else 2
    skip = randn(n, cs, f * h, f * w, gen=gen, dtype=dtype, device=device)
    x = randn(n, cx, h, w, gen=gen, dtype=dtype, device=device)
    return dict(skip=leaf(to_layout(skip, layout)), x=leaf(to_layout(x, layout)))


@device_param
@dtype_param
@layout_param
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(mode, shape, layout, dtype, device):
    inputs = make_inputs(shape, mode, dtype, device, layout)
    (out,), _ = check_against_reference(
        lambda **kw: ops.upsample_concat(**kw, mode=mode),
        lambda **kw: ref.upsample_concat(**kw, mode=mode),
        inputs,
        dtype,
    )
    assert out.is_contiguous(memory_format=ops.memory_format(inputs["skip"]))


@pytest.mark.filterwarnings("ignore:unetx. no unetx kernels")
@dtype_param
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", MODES)
def test_fallback_matches_reference_and_kernel(mode, layout, dtype):
    d = {k: v.detach() for k, v in make_inputs(SHAPES[0], mode, dtype, "cpu", layout).items()}
    fb, kernel = (
        ops.FALLBACKS["upsample_concat"](d["skip"], d["x"], mode),
        torch.ops.unetx.upsample_concat(d["skip"], d["x"], mode),
    )
    assert (fb.shape, fb.dtype, fb.stride()) == (kernel.shape, kernel.dtype, kernel.stride())
    g = torch.randn_like(kernel)
    skip_channels = d["skip"].shape[1]
    g_fb = ops.FALLBACKS["upsample_concat_backward"](g, skip_channels, mode)
    g_kernel = torch.ops.unetx.upsample_concat_backward(g, skip_channels, mode)
    for a, b in zip(g_fb, g_kernel):
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())
    exact = ref.upsample_concat(d["skip"].double(), d["x"].double(), mode)
    if dtype == torch.bfloat16:  # both round the same float interpolation once
        assert max_err(fb, exact) <= 2 * max_err(kernel, exact) + 1e-3 * scale_of(exact)
        for a, b in zip(g_fb, g_kernel):
            assert max_err(a, b) <= 1e-2 * scale_of(b)
    else:
        check_close(fb, exact, dtype)
        for a, b in zip(g_fb, g_kernel):
            check_close(a, b, dtype)


@device_param
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@layout_param
@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode, layout, requires_grad, device):
    d = make_inputs(SHAPES[1], mode, torch.float32, device, layout)
    args = (leaf(d["skip"], requires_grad), leaf(d["x"], requires_grad), mode)
    torch.library.opcheck(torch.ops.unetx.upsample_concat.default, args)
    out = torch.ops.unetx.upsample_concat(d["skip"].detach(), d["x"].detach(), mode)
    torch.library.opcheck(
        torch.ops.unetx.upsample_concat_backward.default,
        (torch.randn_like(out), d["skip"].shape[1], mode),
        test_utils=("test_schema", "test_faketensor"),
    )


@device_param
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode, layout, device):
    d = make_inputs((1, 2, 2, 3, 3), mode, torch.float64, device, layout, seed=1)
    f = lambda skip, x: ops.upsample_concat(skip, x, mode)
    assert torch.autograd.gradcheck(
        f, (d["skip"], d["x"]), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=layout == "channels_last"
    )

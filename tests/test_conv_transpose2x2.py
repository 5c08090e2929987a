"""The CPU GEMM kernels of the 2x2, stride-2 transposed convolution (csrc/cpu/conv_transpose2x2.cpp) inside
conv_bn_relu's transposed layers (the expanding path's learned upsampling): forced with UNETX_CONV_ALGO, against the
float64 layer, within twice the error of ATen's (oneDNN's) transposed convolution on the same inputs, in float32 and
in the reduced-precision dtypes (float32 GEMMs on widened rows)."""

from __future__ import annotations

import pytest
import torch
import unetx
from conftest import max_err

ops = torch.ops.unetx
CL = torch.channels_last
FORCE_GEMM = "convT2x2_forward=gemm,convT2x2_input_grad=gemm,weight_grad=gemm"
FORCE_ATEN = "convT2x2_forward=onednn,convT2x2_input_grad=onednn,weight_grad=onednn"

# (N, C_in, C_out, H, W): 1x1 and odd sizes, channel counts off the vector width, a batch of several rows per thread
SHAPES = [(1, 1, 1, 1, 1), (3, 5, 3, 1, 1), (2, 8, 4, 5, 7), (1, 33, 17, 3, 9), (2, 64, 32, 16, 12)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def layer(dt, x, scale, shift, wt, b, gy):
    cast = lambda t: None if t is None else t.to(dt)
    args = (cast(x), cast(scale), cast(shift), False, None, "none")
    y = ops.conv_bn_relu(*args, cast(wt), cast(b), True, False, False)[0]
    g = ops.conv_bn_relu_backward(
        cast(gy), None, None, *args, cast(wt), True, True, y, y.new_empty(0), False, [True, False, True, True]
    )
    return {"y": y, "grad_x": g[0], "grad_w": g[4], "grad_b": g[5]} | (
        {"grad_scale": g[1], "grad_shift": g[2]} if scale is not None else {}
    )


def inputs(n, c, co, h, w, staged, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=CL)
    scale = torch.rand(c, generator=g) + 0.5 if staged else None
    shift = torch.randn(c, generator=g) if staged else None
    wt = torch.randn(c, co, 2, 2, generator=g) / (4 * c) ** 0.5
    b = torch.randn(co, generator=g)
    gy = torch.randn(n, co, 2 * h, 2 * w, generator=g).contiguous(memory_format=CL)
    return x, scale, shift, wt, b, gy


@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("staged", [False, True], ids=["plain", "bn_relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_kernels_match_float64_within_twice_aten(monkeypatch, shape, staged, dt):
    args = inputs(*shape, staged)
    if dt != torch.float32:  # the reference sees the rounded inputs both dtypes see
        args = tuple(None if a is None else a.to(dt).to(torch.float32) for a in args)
    ref = layer(torch.float64, *args)
    monkeypatch.setenv("UNETX_CONV_ALGO", FORCE_ATEN)
    base = layer(dt, *args)
    monkeypatch.setenv("UNETX_CONV_ALGO", FORCE_GEMM)
    # a pass the GEMMs do not take (1 x 1 images: a layout they refuse) is measured among the others on its first
    # call, each candidate run more than once; the profiled call runs the choice once
    layer(dt, *args)
    with torch.profiler.profile() as prof:
        got = layer(dt, *args)
    # the GEMM kernels ran, not ATen's in their place: the forward, and where the gradient's layout is unambiguously
    # channels-last (not 1 x 1 images), the input and weight gradients
    calls = {e.key: e.count for e in prof.key_averages()}
    aten = calls.get("aten::convolution", 0) + calls.get("aten::convolution_backward", 0)
    if shape[3] * shape[4] > 1:
        assert calls.get("unetx::conv_transpose2x2") == 3 and aten == 0, calls
    else:
        assert calls.get("unetx::conv_transpose2x2", 0) >= 1 and aten <= 2, calls
    for name, r in ref.items():
        # the activations and the layer's own parameters' gradients in dt; grad_scale / grad_shift in their
        # statistics' dtype, whatever ATen's path gives
        want_dt = dt if name in ("y", "grad_x", "grad_w", "grad_b") else got[name].dtype
        assert got[name].shape == r.shape and got[name].dtype == want_dt == base[name].dtype, name
        floor = EPS[dt] * r.abs().max().item()
        err, err_base = max_err(got[name], r), max_err(base[name], r)
        assert err <= 2 * max(err_base, floor), (name, err, err_base)
    for name in ("y", "grad_x", "grad_w"):  # the layouts ATen's path gives (the parameter's own, for grad_w)
        for mf in (torch.contiguous_format, CL):
            assert got[name].is_contiguous(memory_format=mf) == base[name].is_contiguous(memory_format=mf), (name, mf)


def test_channels_last_weight_gives_the_same_bits(monkeypatch):
    """The GEMM kernels repack the weight from its own strides (a model's weights are often channels-last): the
    same results as from a contiguous weight, the weight gradient in the weight's layout."""
    x, scale, shift, wt, b, gy = inputs(2, 24, 16, 5, 7, staged=True)
    monkeypatch.setenv("UNETX_CONV_ALGO", FORCE_GEMM)
    want = layer(torch.float32, x, scale, shift, wt, b, gy)
    got = layer(torch.float32, x, scale, shift, wt.contiguous(memory_format=CL), b, gy)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert got["grad_w"].is_contiguous(memory_format=CL)


@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_input_reaches_the_same_outputs_as_aten(monkeypatch, value, dt):
    x, _, _, wt, b, gy = inputs(2, 6, 5, 4, 5, staged=False)
    x[1, 2, 3, 1] = value
    monkeypatch.setenv("UNETX_CONV_ALGO", FORCE_ATEN)
    base = layer(dt, x, None, None, wt, b, gy)
    monkeypatch.setenv("UNETX_CONV_ALGO", FORCE_GEMM)
    got = layer(dt, x, None, None, wt, b, gy)
    for name in ("y", "grad_w"):
        assert torch.equal(torch.isnan(got[name]), torch.isnan(base[name])), name
        assert torch.equal(torch.isfinite(got[name]), torch.isfinite(base[name])), name


def test_measured_and_cached_per_shape_and_dtype(monkeypatch):
    """Each dtype's choice is its own measurement (ATen's bfloat16 transposed convolution is oneDNN's native one on
    an AVX512-BF16 CPU, a scalar loop on an AVX2 one); float64 has no GEMM kernel, nothing to measure."""
    monkeypatch.delenv("UNETX_CONV_ALGO", raising=False)
    x, _, _, wt, b, gy = inputs(2, 16, 8, 6, 6, staged=False)
    unetx._C.clear_algo_choices()
    for dt in (torch.float32, torch.bfloat16):
        layer(dt, x, None, None, wt, b, gy)
    decisions = {(d["family"], d["key"].split(",")[0]): d for d in unetx._C.algo_choices()}
    for dt in ("Float", "BFloat16"):
        for family in ("convT2x2_forward", "convT2x2_input_grad"):
            assert set(decisions[family, dt]["seconds"]) == {"onednn", "gemm"}, decisions
        assert "gemm" in decisions["weight_grad", dt]["seconds"], decisions["weight_grad", dt]
    unetx._C.clear_algo_choices()
    layer(torch.float64, x, None, None, wt, b, gy)
    assert not [d for d in unetx._C.algo_choices() if d["family"].startswith("convT2x2")]

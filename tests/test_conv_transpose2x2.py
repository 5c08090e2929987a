"""The CPU GEMM kernels of the 2x2, stride-2 transposed convolution (csrc/cpu/conv_transpose2x2.cpp) inside
conv_bn_relu's transposed layers (the expanding path's learned upsampling): forced with UNETX_CONV_ALGO, against the
float64 layer, within twice the error of ATen's (oneDNN's) transposed convolution on the same inputs."""

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


@pytest.mark.parametrize("staged", [False, True], ids=["plain", "bn_relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_kernels_match_float64_within_twice_aten(monkeypatch, shape, staged):
    args = inputs(*shape, staged)
    ref = layer(torch.float64, *args)
    monkeypatch.setenv("UNETX_CONV_ALGO", FORCE_ATEN)
    base = layer(torch.float32, *args)
    monkeypatch.setenv("UNETX_CONV_ALGO", FORCE_GEMM)
    got = layer(torch.float32, *args)
    for name, r in ref.items():
        assert got[name].shape == r.shape and got[name].dtype == torch.float32, name
        floor = 2.0**-23 * r.abs().max().item()
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


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_input_reaches_the_same_outputs_as_aten(monkeypatch, value):
    x, _, _, wt, b, gy = inputs(2, 6, 5, 4, 5, staged=False)
    x[1, 2, 3, 1] = value
    monkeypatch.setenv("UNETX_CONV_ALGO", FORCE_ATEN)
    base = layer(torch.float32, x, None, None, wt, b, gy)
    monkeypatch.setenv("UNETX_CONV_ALGO", FORCE_GEMM)
    got = layer(torch.float32, x, None, None, wt, b, gy)
    for name in ("y", "grad_w"):
        assert torch.equal(torch.isnan(got[name]), torch.isnan(base[name])), name
        assert torch.equal(torch.isfinite(got[name]), torch.isfinite(base[name])), name


def test_measured_and_cached_per_shape_float32_only(monkeypatch):
    monkeypatch.delenv("UNETX_CONV_ALGO", raising=False)
    x, _, _, wt, b, gy = inputs(2, 16, 8, 6, 6, staged=False)
    unetx._C.clear_algo_choices()
    layer(torch.float32, x, None, None, wt, b, gy)
    decisions = {d["family"]: d for d in unetx._C.algo_choices()}
    for family in ("convT2x2_forward", "convT2x2_input_grad"):
        assert set(decisions[family]["seconds"]) == {"onednn", "gemm"}, decisions
    assert "gemm" in decisions["weight_grad"]["seconds"], decisions["weight_grad"]
    unetx._C.clear_algo_choices()
    layer(torch.bfloat16, x, None, None, wt, b, gy)  # bfloat16: ATen's only, nothing to measure
    assert not [d for d in unetx._C.algo_choices() if d["family"].startswith("convT2x2")]

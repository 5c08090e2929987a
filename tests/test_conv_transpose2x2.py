"""The CPU row-GEMM kernels (csrc/cpu/conv_transpose2x2.cpp) inside conv_bn_relu's layers that are one GEMM per
pixel row: the 2x2, stride-2 transposed convolution (the expanding path's learned upsampling) and the 1x1 convolution
(the head, and the convolution after a nearest / bilinear upsampling). Forced with UNETX_CONV_ALGO, against the
float64 layer, within twice the error of ATen's (oneDNN's) convolution on the same inputs, in float32 and in the
reduced-precision dtypes (float32 GEMMs on widened rows)."""

from __future__ import annotations

import pytest
import torch
import unetx
from conftest import max_err

ops = torch.ops.unetx
CL = torch.channels_last


class Kind:
    """A layer the kernels serve: its kernel size, whether transposed, the families it forces, its profile event."""

    def __init__(self, name, k, transposed, families, gemm_weight_grad, event):
        self.name, self.k, self.transposed, self.families, self.event = name, k, transposed, families, event
        self.force_gemm = ",".join([f"{f}=gemm" for f in families] + [f"weight_grad={gemm_weight_grad}"])
        self.force_aten = ",".join(f"{f}=onednn" for f in [*families, "weight_grad"])
        self.gemm_weight_grad = gemm_weight_grad

    def __repr__(self):
        return self.name


TRANSPOSED = Kind(
    "transposed2x2", 2, True, ["convT2x2_forward", "convT2x2_input_grad"], "gemm", "unetx::conv_transpose2x2"
)
CONV1X1 = Kind("conv1x1", 1, False, ["conv1x1_forward", "conv1x1_input_grad"], "gemm1x1", "unetx::conv1x1")
KINDS = [TRANSPOSED, CONV1X1]

# (N, C_in, C_out, H, W): 1x1 and odd sizes, channel counts off the vector width, a batch of several rows per thread
SHAPES = [(1, 1, 1, 1, 1), (3, 5, 3, 1, 1), (2, 8, 4, 5, 7), (1, 33, 17, 3, 9), (2, 64, 32, 16, 12)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def layer(kind, dt, x, scale, shift, wt, b, gy):
    cast = lambda t: None if t is None else t.to(dt)
    args = (cast(x), cast(scale), cast(shift), False, None, "none")
    y = ops.conv_bn_relu(*args, cast(wt), cast(b), kind.transposed, False, False)[0]
    mask = [True, False, True, True]
    g = ops.conv_bn_relu_backward(
        cast(gy), None, None, *args, cast(wt), True, kind.transposed, y, y.new_empty(0), False, mask
    )
    return {"y": y, "grad_x": g[0], "grad_w": g[4], "grad_b": g[5]} | (
        {"grad_scale": g[1], "grad_shift": g[2]} if scale is not None else {}
    )


def inputs(kind, n, c, co, h, w, staged, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=CL)
    scale = torch.rand(c, generator=g) + 0.5 if staged else None
    shift = torch.randn(c, generator=g) if staged else None
    k = kind.k
    wt = torch.randn(*((c, co) if kind.transposed else (co, c)), k, k, generator=g) / (k * k * c) ** 0.5
    b = torch.randn(co, generator=g)
    f = k if kind.transposed else 1  # the output's size per input pixel
    gy = torch.randn(n, co, f * h, f * w, generator=g).contiguous(memory_format=CL)
    return x, scale, shift, wt, b, gy


@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("staged", [False, True], ids=["plain", "bn_relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_gemm_kernels_match_float64_within_twice_aten(monkeypatch, kind, shape, staged, dt):
    args = inputs(kind, *shape, staged)
    if dt != torch.float32:  # the reference sees the rounded inputs both dtypes see
        args = tuple(None if a is None else a.to(dt).to(torch.float32) for a in args)
    ref = layer(kind, torch.float64, *args)
    monkeypatch.setenv("UNETX_CONV_ALGO", kind.force_aten)
    base = layer(kind, dt, *args)
    monkeypatch.setenv("UNETX_CONV_ALGO", kind.force_gemm)
    # a pass the GEMMs do not take (1 x 1 images: a layout they refuse) is measured among the others on its first
    # call, each candidate run more than once; the profiled call runs the choice once
    layer(kind, dt, *args)
    with torch.profiler.profile() as prof:
        got = layer(kind, dt, *args)
    # the GEMM kernels ran, not ATen's in their place: the forward, and where the gradient's layout is unambiguously
    # channels-last (not 1 x 1 images), the input and weight gradients
    calls = {e.key: e.count for e in prof.key_averages()}
    aten = calls.get("aten::convolution", 0) + calls.get("aten::convolution_backward", 0)
    if shape[3] * shape[4] > 1:
        assert calls.get(kind.event) == 3 and aten == 0, calls
    else:
        assert calls.get(kind.event, 0) >= 1 and aten <= 2, calls
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


@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_channels_last_weight_gives_the_same_bits(monkeypatch, kind):
    """The GEMM kernels repack the weight from its own strides (a model's weights are often channels-last): the
    same results as from a contiguous weight, the weight gradient in the weight's layout."""
    x, scale, shift, wt, b, gy = inputs(kind, 2, 24, 16, 5, 7, staged=True)
    monkeypatch.setenv("UNETX_CONV_ALGO", kind.force_gemm)
    want = layer(kind, torch.float32, x, scale, shift, wt, b, gy)
    got = layer(kind, torch.float32, x, scale, shift, wt.contiguous(memory_format=CL), b, gy)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert got["grad_w"].is_contiguous(memory_format=CL)


@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_nonfinite_input_reaches_the_same_outputs_as_aten(monkeypatch, kind, value, dt):
    x, _, _, wt, b, gy = inputs(kind, 2, 6, 5, 4, 5, staged=False)
    x[1, 2, 3, 1] = value
    monkeypatch.setenv("UNETX_CONV_ALGO", kind.force_aten)
    base = layer(kind, dt, x, None, None, wt, b, gy)
    monkeypatch.setenv("UNETX_CONV_ALGO", kind.force_gemm)
    got = layer(kind, dt, x, None, None, wt, b, gy)
    for name in ("y", "grad_w"):
        assert torch.equal(torch.isnan(got[name]), torch.isnan(base[name])), name
        assert torch.equal(torch.isfinite(got[name]), torch.isfinite(base[name])), name


@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_measured_and_cached_per_shape_and_dtype(monkeypatch, kind):
    """Each dtype's choice is its own measurement (ATen's bfloat16 convolutions are oneDNN's native ones on an
    AVX512-BF16 CPU, scalar loops on an AVX2 one); float64 has no GEMM kernel, nothing to measure."""
    monkeypatch.delenv("UNETX_CONV_ALGO", raising=False)
    x, _, _, wt, b, gy = inputs(kind, 2, 16, 8, 6, 6, staged=False)
    unetx._C.clear_algo_choices()
    for dt in (torch.float32, torch.bfloat16):
        layer(kind, dt, x, None, None, wt, b, gy)
    decisions = {(d["family"], d["key"].split(",")[0]): d for d in unetx._C.algo_choices()}
    for dt in ("Float", "BFloat16"):
        for family in kind.families:
            assert set(decisions[family, dt]["seconds"]) == {"onednn", "gemm"}, decisions
        assert kind.gemm_weight_grad in decisions["weight_grad", dt]["seconds"], decisions["weight_grad", dt]
    unetx._C.clear_algo_choices()
    layer(kind, torch.float64, x, None, None, wt, b, gy)
    assert not [d for d in unetx._C.algo_choices() if d["family"] in kind.families]

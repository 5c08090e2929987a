"""The CPU row-GEMM kernels (csrc/cpu/conv_transpose2x2.cpp) inside conv_bn_relu's layers that are one GEMM per
pixel row: the 2x2, stride-2 transposed convolution (the expanding path's learned upsampling) and the 1x1 convolution
(the head, and the convolution after a nearest / bilinear upsampling). Forced with UNETX_CONV_ALGO, against the
float64 layer, within twice the error of ATen's (oneDNN's) convolution on the same inputs, in float32 and in the
reduced-precision dtypes (float32 GEMMs on widened rows)."""

from __future__ import annotations

import pytest
import torch
import unetx
from conftest import BF16_FLOOR, check_vs_stock, max_err

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


def aten_and_gemm(monkeypatch, kind, run):
    """run() with ATen's convolutions forced, then with the GEMM kernels forced and profiled: (ATen's result, the
    GEMMs' result, the profiled call's op counts, its ATen convolution calls)."""
    monkeypatch.setenv("UNETX_CONV_ALGO", kind.force_aten)
    base = run()
    monkeypatch.setenv("UNETX_CONV_ALGO", kind.force_gemm)
    # a pass the GEMMs do not take (1 x 1 images: a layout they refuse) is measured among the others on its first
    # call, each candidate run more than once; the profiled call runs the choice once
    run()
    with torch.profiler.profile() as prof:
        got = run()
    calls = {e.key: e.count for e in prof.key_averages()}
    return base, got, calls, calls.get("aten::convolution", 0) + calls.get("aten::convolution_backward", 0)


@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("staged", [False, True], ids=["plain", "bn_relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_gemm_kernels_match_float64_within_twice_aten(monkeypatch, kind, shape, staged, dt):
    args = inputs(kind, *shape, staged)
    if dt != torch.float32:  # the reference sees the rounded inputs both dtypes see
        args = tuple(None if a is None else a.to(dt).to(torch.float32) for a in args)
    ref = layer(kind, torch.float64, *args)
    base, got, calls, aten = aten_and_gemm(monkeypatch, kind, lambda: layer(kind, dt, *args))
    # the GEMM kernels ran, not ATen's in their place: the forward, and where the gradient's layout is unambiguously
    # channels-last (not 1 x 1 images), the input and weight gradients
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
    # other strides: channels-last for the 2x2 weight; a 1x1 weight is channels-last already, so its two channel
    # dimensions swapped in memory
    other = wt.contiguous(memory_format=CL) if kind.transposed else wt[:, :, 0, 0].t().contiguous().t()[..., None, None]
    assert torch.equal(other, wt) and other.stride() != wt.stride()
    monkeypatch.setenv("UNETX_CONV_ALGO", kind.force_gemm)
    want = layer(kind, torch.float32, x, scale, shift, wt, b, gy)
    got = layer(kind, torch.float32, x, scale, shift, other, b, gy)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert got["grad_w"].stride() == other.stride() and want["grad_w"].stride() == wt.stride()


# A 1x1 layer's input stage and epilogue, each on its own: the batch-norm centre, the pooled input, an upsampled
# second input (the head never has one, but the op takes it), training statistics, eval ReLU.
STAGES = ["mean", "pool", "nearest", "bilinear", "stats", "relu"]


def conv1x1_layer(dt, stage, x, scale, shift, mean_in, x2, wt, b, gy, gmean, gvar):
    cast = lambda t: None if t is None else t.to(dt)
    x2_mode = stage if stage in ("nearest", "bilinear") else "none"
    stats, relu = stage == "stats", stage == "relu"
    args = (cast(x), cast(scale), cast(shift), stage == "pool", cast(x2) if x2_mode != "none" else None, x2_mode)
    x_mean = mean_in if stage == "mean" else None  # the BatchNorm vectors stay float32, as the model passes them
    y, mean, var = ops.conv_bn_relu(*args, cast(wt), cast(b), False, stats, relu, x_mean)
    g = ops.conv_bn_relu_backward(
        cast(gy),
        gmean if stats else None,
        gvar if stats else None,
        *args,
        cast(wt),
        True,
        False,
        y,
        mean if stats else y.new_empty(0),
        relu,
        [True, x2_mode != "none", True, True],
        x_mean,
    )
    names = ["grad_x", "grad_scale", "grad_shift", "grad_x2", "grad_w", "grad_b", "grad_mean"]
    out = {"y": y} | ({"mean": mean, "var": var} if stats else {})
    return out | {n: t for n, t in zip(names, g) if t is not None}


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("stage", STAGES)
def test_conv1x1_with_each_input_stage_and_epilogue(monkeypatch, stage, dt):
    """The row GEMMs of a 1x1 layer (forced), against the float64 layer, within twice the error of ATen's on the same
    inputs, for each input stage and epilogue the fused op composes around the convolution."""
    g = torch.Generator().manual_seed(3)
    n, c1, c2, co, h, w = 2, 6, 4, 5, 6, 10
    f = 2 if stage == "pool" else 1
    x = torch.randn(n, c1, f * h, f * w, generator=g).contiguous(memory_format=CL)
    scale, shift = torch.rand(c1, generator=g) + 0.5, torch.randn(c1, generator=g)
    mean_in = torch.randn(c1, generator=g)
    x2 = torch.randn(n, c2, h // 2, w // 2, generator=g).contiguous(memory_format=CL)
    cin = c1 + (c2 if stage in ("nearest", "bilinear") else 0)
    wt = torch.randn(co, cin, 1, 1, generator=g) / cin**0.5
    b = torch.randn(co, generator=g)
    gy = torch.randn(n, co, h, w, generator=g).contiguous(memory_format=CL)
    gmean, gvar = torch.randn(co, generator=g), torch.randn(co, generator=g)
    rounded = lambda t: t.to(dt).to(torch.float32)  # the reference sees the rounded inputs both paths see
    x, scale, shift, x2, wt, b, gy = (rounded(t) for t in (x, scale, shift, x2, wt, b, gy))
    args = (x, scale, shift, mean_in, x2, wt, b, gy, gmean, gvar)
    ref = conv1x1_layer(torch.float64, stage, *(a.double() for a in args))
    base, got, calls, aten = aten_and_gemm(monkeypatch, CONV1X1, lambda: conv1x1_layer(dt, stage, *args))
    assert calls.get("unetx::conv1x1") == 3 and aten == 0, calls  # forward, input gradient, weight gradient
    assert got.keys() == ref.keys() == base.keys()
    for name, r in ref.items():
        assert got[name].dtype == base[name].dtype, name
        # float32: twice ATen's error plus a few ulps of the largest value (the weight gradient sums rows in another
        # order than oneDNN); bf16: plus one rounding of the largest value (conftest)
        check_vs_stock(got[name], base[name], r, name, floor=5e-7 if dt == torch.float32 else BF16_FLOOR)


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

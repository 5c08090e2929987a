"""Bad input to the unetx ops (conv_bn_relu, bn_relu, bn_relu_pool, avg_pool2x2, upsample_concat): each is
rejected at the boundary with a message naming the offending sizes, dtypes, devices or values."""

from __future__ import annotations

import pytest
import torch
import unetx
import unetx.nn
from conftest import randn
from unetx import ops
from unetx import reference as ref

OTHER_DEVICE = "cuda" if torch.cuda.is_available() else "meta"


def on_other_device(name: str) -> str:
    return rf"{name} is on {OTHER_DEVICE}"


def x(*shape, dtype=torch.float32, device="cpu"):
    return randn(*shape, dtype=dtype, device=device)


def vec(c, device="cpu", dtype=torch.float32):
    return randn(c, device=device, dtype=dtype).abs() + 0.5


CASES = {
    # wrong rank
    "conv_bn_relu x 3-D": (
        lambda: ops.conv_bn_relu(x(3, 8, 8), x(4, 3, 3, 3)),
        r"conv_bn_relu: expected x to be a 4-D .* got shape \[3, 8, 8\]",
    ),
    "conv_bn_relu weight 3-D": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3)),
        r"conv_bn_relu: expected a 4-D weight, got shape \[4, 3, 3\]",
    ),
    "conv_bn_relu x2 5-D": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 5, 3, 3), x2=x(2, 2, 4, 4, 1), x2_mode="nearest"),
        r"expected x2 to be a 4-D .* got shape \[2, 2, 4, 4, 1\]",
    ),
    "bn_relu y 2-D": (lambda: ops.bn_relu(x(3, 8), vec(3), vec(3)), r"bn_relu: expected y to be a 4-D .* \[3, 8\]"),
    "bn_relu_pool y 3-D": (lambda: ops.bn_relu_pool(x(3, 8, 8), vec(3), vec(3)), r"bn_relu_pool: .*\[3, 8, 8\]"),
    "avg_pool2x2 x 3-D": (lambda: ops.avg_pool2x2(x(3, 8, 8)), r"avg_pool2x2: expected x to be a 4-D .*\[3, 8, 8\]"),
    "upsample_concat skip 3-D": (
        lambda: ops.upsample_concat(x(3, 8, 8), x(2, 3, 4, 4)),
        r"upsample_concat: expected skip to be a 4-D .*\[3, 8, 8\]",
    ),
    "bn_relu scale 2-D": (
        lambda: ops.bn_relu(x(2, 3, 4, 4), vec(3).view(1, 3), vec(3)),
        r"expected scale of shape \[3\] \(one value per channel\), got \[1, 3\]",
    ),
    # mismatched dtypes
    "conv_bn_relu x vs weight dtype": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3, dtype=torch.float64)),
        r"x is Float but weight is Double",
    ),
    "conv_bn_relu x vs x2 dtype": (
        lambda: ops.conv_bn_relu(
            x(2, 3, 8, 8), x(4, 5, 3, 3), x2=x(2, 2, 4, 4, dtype=torch.bfloat16), x2_mode="nearest"
        ),
        r"x is Float but x2 is BFloat16",
    ),
    "conv_bn_relu bias dtype": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3), x(4, dtype=torch.float64)),
        r"x is Float but bias is Double",
    ),
    "upsample_concat dtype": (
        lambda: ops.upsample_concat(x(2, 3, 8, 8), x(2, 3, 4, 4, dtype=torch.float64)),
        r"skip is Float but x is Double",
    ),
    "integer input": (
        lambda: ops.avg_pool2x2(torch.ones(2, 3, 4, 4, dtype=torch.int64)),
        r"expected x to be a floating-point tensor, got Long",
    ),
    "integer scale": (
        lambda: ops.bn_relu(x(2, 3, 4, 4), torch.ones(3, dtype=torch.int64), vec(3)),
        r"expected scale to be floating-point, got Long",
    ),
    # mismatched devices (cuda vs cpu where there is a GPU; else meta vs cpu, which dispatches to the fake impls)
    "conv_bn_relu weight device": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3, device=OTHER_DEVICE)),
        on_other_device("weight"),
    ),
    "conv_bn_relu x_scale device": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3), x_scale=vec(3, OTHER_DEVICE), x_shift=vec(3)),
        on_other_device("x_scale"),
    ),
    "conv_bn_relu x2 device": (
        lambda: ops.conv_bn_relu(
            x(2, 3, 8, 8), x(4, 5, 3, 3), x_pool=False, x2=x(2, 2, 4, 4, device=OTHER_DEVICE), x2_mode="nearest"
        ),
        on_other_device("x2"),
    ),
    "bn_relu scale device": (
        lambda: ops.bn_relu(x(2, 3, 4, 4), vec(3, OTHER_DEVICE), vec(3)),
        on_other_device("scale"),
    ),
    "bn_relu y device": (
        lambda: ops.bn_relu(x(2, 3, 4, 4, device=OTHER_DEVICE), vec(3), vec(3)),
        rf"(y is on {OTHER_DEVICE}|the input is on {OTHER_DEVICE})",
    ),
    "bn_relu_pool mean device": (
        lambda: ops.bn_relu_pool(x(2, 3, 4, 4), vec(3), vec(3), vec(3, OTHER_DEVICE)),
        on_other_device("mean"),
    ),
    "upsample_concat device": (
        lambda: ops.upsample_concat(x(2, 3, 8, 8), x(2, 3, 4, 4, device=OTHER_DEVICE)),
        on_other_device("x"),
    ),
    # channel mismatches
    "conv_bn_relu weight channels": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 5, 3, 3)),
        r"weight \[4, 5, 3, 3\] expects 5 input channels, but x has 3",
    ),
    "conv_bn_relu weight channels with x2": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 6, 3, 3), x2=x(2, 4, 4, 4), x2_mode="nearest"),
        r"weight \[4, 6, 3, 3\] expects 6 input channels, but x has 3 and x2 has 4 \(total 7\)",
    ),
    "conv_bn_relu transposed weight channels": (
        lambda: ops.conv_bn_relu(x(2, 3, 4, 4), x(5, 2, 2, 2), transposed=True, stats=False),
        r"weight \[5, 2, 2, 2\] expects 5 input channels, but x has 3",
    ),
    "conv_bn_relu x_scale channels": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3), x_scale=vec(5), x_shift=vec(3)),
        r"expected x_scale of shape \[3\] \(one value per channel\), got \[5\]",
    ),
    "conv_bn_relu x_mean channels": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3), x_scale=vec(3), x_shift=vec(3), x_mean=vec(2)),
        r"expected x_mean of shape \[3\] .*got \[2\]",
    ),
    "conv_bn_relu bias channels": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3), x(3)),
        r"expected bias of shape \[4\], got \[3\]",
    ),
    "conv_bn_relu even kernel": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 2, 2)),
        r"'same' convolution needs an odd kernel size, got 2",
    ),
    "conv_bn_relu x_scale without x_shift": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3), x_scale=vec(3)),
        r"x_scale and x_shift must be given together",
    ),
    "conv_bn_relu x_mean without x_scale": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3), x_mean=vec(3)),
        r"x_mean needs x_scale and x_shift",
    ),
    "bn_relu shift channels": (
        lambda: ops.bn_relu(x(2, 3, 4, 4), vec(3), vec(4)),
        r"bn_relu: expected shift of shape \[3\] .*got \[4\]",
    ),
    "bn_relu mean channels": (
        lambda: ops.bn_relu(x(2, 7, 4, 4), vec(7), vec(7), vec(5)),
        r"bn_relu: expected mean of shape \[7\] .*got \[5\]",
    ),
    # skip vs upsampled spatial size
    "upsample_concat spatial": (
        lambda: ops.upsample_concat(x(2, 3, 8, 8), x(2, 3, 5, 4)),
        r"skip \[2, 3, 8, 8\] does not match x \[2, 3, 5, 4\] upsampled 2x "
        r"\(expected skip of shape \[2, \*, 10, 8\]\)",
    ),
    "upsample_concat batch": (
        lambda: ops.upsample_concat(x(2, 3, 8, 8), x(3, 3, 4, 4)),
        r"skip \[2, 3, 8, 8\] does not match x \[3, 3, 4, 4\]",
    ),
    "upsample_concat none-mode spatial": (
        lambda: ops.upsample_concat(x(2, 3, 8, 8), x(2, 3, 4, 4), "none"),
        r"skip \[2, 3, 8, 8\] does not match x \[2, 3, 4, 4\] upsampled 1x",
    ),
    "conv_bn_relu x2 spatial": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 6, 3, 3), x2=x(2, 3, 5, 4), x2_mode="bilinear"),
        r"x2 of shape \[2, 3, 5, 4\] upsampled 2x does not match the skip input's spatial "
        r"size \[2, \*, 8, 8\]",
    ),
    "conv_bn_relu x2 spatial after pool": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 6, 3, 3), x_pool=True, x2=x(2, 3, 4, 4), x2_mode="nearest"),
        r"x2 of shape \[2, 3, 4, 4\] upsampled 2x does not match .*\[2, \*, 4, 4\]",
    ),
    # odd spatial size for pooling
    "avg_pool2x2 odd": (
        lambda: ops.avg_pool2x2(x(2, 3, 7, 8)),
        r"2x2 pooling needs an even height and width, got input of shape \[2, 3, 7, 8\]",
    ),
    "bn_relu_pool odd": (
        lambda: ops.bn_relu_pool(x(2, 3, 8, 9), vec(3), vec(3)),
        r"bn_relu_pool: 2x2 pooling needs an even .*\[2, 3, 8, 9\]",
    ),
    "conv_bn_relu x_pool odd": (
        lambda: ops.conv_bn_relu(x(2, 3, 7, 9), x(4, 3, 3, 3), x_pool=True),
        r"conv_bn_relu: 2x2 pooling needs an even .*\[2, 3, 7, 9\]",
    ),
    "conv_bn_relu stats and relu": (
        lambda: ops.conv_bn_relu(x(2, 3, 4, 4), x(4, 3, 3, 3), stats=True, relu=True),
        r"stats .* and relu .* exclude each other",
    ),
    # upsampling mode
    "upsample_concat mode": (
        lambda: ops.upsample_concat(x(2, 3, 8, 8), x(2, 3, 4, 4), "bicubic"),
        r"upsampling mode must be 'none', 'nearest' or 'bilinear', got 'bicubic'",
    ),
    "conv_bn_relu x2_mode": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 6, 3, 3), x2=x(2, 3, 4, 4), x2_mode="Nearest"),
        r"upsampling mode must be 'none', 'nearest' or 'bilinear', got 'Nearest'",
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_bad_input_is_rejected_with_the_offending_value(case):
    call, message = CASES[case]
    with pytest.raises(RuntimeError, match=message):
        call()


# one value per channel in a training batch: ValueError, as nn.BatchNorm2d raises (code written against stock
# catches ValueError)
ONE_VALUE_CASES = {
    "conv_bn_relu 1x1 batch stats": (
        lambda: ops.conv_bn_relu(x(1, 3, 1, 1), x(4, 3, 3, 3), stats=True),
        r"Expected more than 1 value per channel when training, got input size "
        r"\[1, 4, 1, 1\]",
    ),
    "conv_bn_relu pooled to 1x1 stats": (
        lambda: ops.conv_bn_relu(x(1, 3, 2, 2), x(4, 3, 1, 1), x_pool=True),
        r"more than 1 value per channel .*\[1, 4, 1, 1\]",
    ),
    "fallback conv_bn_relu 1x1 batch stats": (
        lambda: ops.FALLBACKS["conv_bn_relu"](
            x(1, 3, 1, 1), None, None, False, None, "none", x(4, 3, 3, 3), None, False, True, False
        ),
        r"Expected more than 1 value per channel when training, got input size \[1, 4, 1, 1\]",
    ),
}


@pytest.mark.filterwarnings("ignore:unetx. no unetx kernels")
@pytest.mark.parametrize("case", list(ONE_VALUE_CASES), ids=str)
def test_one_value_per_channel_in_training_is_a_value_error_like_batchnorm(case):
    call, message = ONE_VALUE_CASES[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_modules_raise_batchnorms_exception_for_one_value_per_channel():
    """A drop-in: unetx's layer raises what its stock twin raises, with the same text."""
    stock = ref.ConvBNReLU(3, 4)
    fused = unetx.nn.ConvBNReLU(3, 4)
    with pytest.raises(ValueError) as want:
        stock(x(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size"):
        fused(x(1, 3, 1, 1))
    assert "Expected more than 1 value per channel when training" in str(want.value)


def test_nothing_is_rejected_that_should_pass():
    """The boundary cases just inside the checks run: a 1x1 kernel on 2 values per channel, odd sizes without
    pooling, a single-channel input, a 1x1 skip."""
    ops.conv_bn_relu(x(1, 1, 1, 2), x(3, 1, 1, 1), stats=True)
    ops.conv_bn_relu(x(1, 3, 7, 9), x(2, 3, 3, 3), stats=False, relu=True)
    ops.upsample_concat(x(1, 1, 2, 2), x(1, 1, 1, 1), "bilinear")
    ops.bn_relu_pool(x(1, 1, 2, 2), vec(1), vec(1))


@pytest.mark.parametrize("case", ["bad conv_bn_relu backward", "bad upsample_concat_backward"])
def test_backward_ops_check_their_arguments(case):
    if case == "bad conv_bn_relu backward":
        with pytest.raises(RuntimeError, match=r"weight \[4, 5, 3, 3\] expects 5 input channels, but x has 3"):
            torch.ops.unetx.conv_bn_relu_backward(
                x(2, 4, 8, 8),
                None,
                None,
                x(2, 3, 8, 8),
                None,
                None,
                False,
                None,
                "none",
                x(4, 5, 3, 3),
                False,
                False,
                x(2, 4, 8, 8),
                x(4),
                False,
                [True, True, True, True],
            )
    else:
        with pytest.raises(RuntimeError, match=r"skip_channels=9 out of range for grad \[2, 6, 8, 8\]"):
            torch.ops.unetx.upsample_concat_backward(x(2, 6, 8, 8), 9, "nearest")


FALLBACK_DEVICE_CASES = {
    "conv_bn_relu": (
        lambda d: ops.FALLBACKS["conv_bn_relu"](
            x(2, 3, 8, 8), None, None, False, None, "none", x(4, 3, 3, 3, device=d), None, False, True, False
        ),
        "weight",
    ),
    "bn_relu": (lambda d: ops.FALLBACKS["bn_relu"](x(2, 3, 4, 4), vec(3), vec(3, d)), "shift"),
    "bn_relu_pool": (lambda d: ops.FALLBACKS["bn_relu_pool"](x(2, 3, 4, 4), vec(3, d), vec(3)), "scale"),
    "upsample_concat": (
        lambda d: ops.FALLBACKS["upsample_concat"](x(2, 3, 8, 8), x(2, 3, 4, 4, device=d), "nearest"),
        "x",
    ),
}


@pytest.mark.filterwarnings("ignore:unetx. no unetx kernels")
@pytest.mark.parametrize("op_name", list(FALLBACK_DEVICE_CASES))
def test_fallback_names_the_mismatched_device(op_name):
    """The stock fallback (CUDA without unetx kernels) raises the kernels' device message, not a stock op's."""
    call, name = FALLBACK_DEVICE_CASES[op_name]
    with pytest.raises(RuntimeError, match=rf"{op_name}: .* but {name} is on meta; move both to the same device"):
        call("meta")


# ---------------------------------------------------------------------------------------------- backward ops
# Every backward op checks every argument (device, dtype, shape) with a message naming the op and the argument: in
# its CPU kernel's entry (csrc/ops.cpp, csrc/conv_bn_relu.cpp) and in its fake impl (unetx.ops), which is where a
# call mixing meta and CPU tensors, or an all-meta call, lands.
def _g(*shape, dtype=torch.float32, device="cpu"):
    return x(*shape, dtype=dtype, device=device)


def _conv_bw(d, grad_y=None, y=None, mean=None, grad_var="v", relu=False, x_dtype=torch.float32):
    """conv_bn_relu_backward of a 3 -> 4 channel 3x3 layer on (2, 3, 8, 8) with batch statistics."""
    gv = _g(4, device=d) if grad_var == "v" else grad_var
    return torch.ops.unetx.conv_bn_relu_backward(
        _g(2, 4, 8, 8, device=d) if grad_y is None else grad_y,
        _g(4, device=d),
        gv,
        _g(2, 3, 8, 8, dtype=x_dtype, device=d),
        None,
        None,
        False,
        None,
        "none",
        _g(4, 3, 3, 3, dtype=x_dtype, device=d),
        False,
        False,
        _g(2, 4, 8, 8, device=d) if y is None else y,
        _g(4, device=d) if mean is None else mean,
        relu,
        [True, True, True, True],
    )


BACKWARD_CASES = {
    # (call(device), message): device is "cpu" (the kernels' checks) or "meta" (the fake impls')
    "bn_relu_backward grad shape": (
        lambda d: torch.ops.unetx.bn_relu_backward(
            _g(2, 3, 4, 5, device=d), _g(2, 3, 4, 4, device=d), vec(3, d), vec(3, d)
        ),
        r"unetx.bn_relu_backward: expected grad of shape \[2, 3, 4, 4\], got \[2, 3, 4, 5\]",
    ),
    "bn_relu_backward float64 y, float32 grad": (
        lambda d: torch.ops.unetx.bn_relu_backward(
            _g(2, 3, 4, 4, device=d), _g(2, 3, 4, 4, dtype=torch.float64, device=d), vec(3, d), vec(3, d)
        ),
        r"unetx.bn_relu_backward: y is Double but grad is Float",
    ),
    "bn_relu_backward scale shape": (
        lambda d: torch.ops.unetx.bn_relu_backward(
            _g(2, 3, 4, 4, device=d), _g(2, 3, 4, 4, device=d), vec(4, d), vec(3, d)
        ),
        r"unetx.bn_relu_backward: expected scale of shape \[3\] \(one value per channel\), got \[4\]",
    ),
    "bn_relu_backward y 3-D": (
        lambda d: torch.ops.unetx.bn_relu_backward(_g(3, 4, 4, device=d), _g(3, 4, 4, device=d), vec(3, d), vec(3, d)),
        r"unetx.bn_relu_backward: expected y to be a 4-D .*\[3, 4, 4\]",
    ),
    "bn_relu_pool_backward grad_p shape": (
        lambda d: torch.ops.unetx.bn_relu_pool_backward(
            _g(2, 3, 4, 4, device=d), _g(2, 3, 2, 3, device=d), _g(2, 3, 4, 4, device=d), vec(3, d), vec(3, d)
        ),
        r"unetx.bn_relu_pool_backward: expected grad_p of shape \[2, 3, 2, 2\], got \[2, 3, 2, 3\]",
    ),
    "bn_relu_pool_backward grad_z dtype": (
        lambda d: torch.ops.unetx.bn_relu_pool_backward(
            _g(2, 3, 4, 4, dtype=torch.bfloat16, device=d),
            _g(2, 3, 2, 2, device=d),
            _g(2, 3, 4, 4, device=d),
            vec(3, d),
            vec(3, d),
        ),
        r"unetx.bn_relu_pool_backward: y is Float but grad_z is BFloat16",
    ),
    "bn_relu_pool_backward odd y": (
        lambda d: torch.ops.unetx.bn_relu_pool_backward(
            _g(2, 3, 5, 4, device=d), _g(2, 3, 2, 2, device=d), _g(2, 3, 5, 4, device=d), vec(3, d), vec(3, d)
        ),
        r"unetx.bn_relu_pool_backward: 2x2 pooling needs an even height and width",
    ),
    "avg_pool2x2_backward grad 3-D": (
        lambda d: torch.ops.unetx.avg_pool2x2_backward(_g(3, 4, 4, device=d)),
        r"unetx.avg_pool2x2_backward: expected grad to be a 4-D .*\[3, 4, 4\]",
    ),
    "avg_pool2x2_backward integer grad": (
        lambda d: torch.ops.unetx.avg_pool2x2_backward(torch.ones(2, 3, 4, 4, dtype=torch.int64, device=d)),
        r"unetx.avg_pool2x2_backward: expected grad to be a floating-point tensor, got Long",
    ),
    "upsample_concat_backward odd grad": (
        lambda d: torch.ops.unetx.upsample_concat_backward(_g(2, 6, 7, 8, device=d), 3, "bilinear"),
        r"grad \[2, 6, 7, 8\] must have an even height and width for 2x upsampling",
    ),
    "upsample_concat_backward mode": (
        lambda d: torch.ops.unetx.upsample_concat_backward(_g(2, 6, 8, 8, device=d), 3, "area"),
        r"upsample_concat_backward: upsampling mode must be .*got 'area'",
    ),
    "conv_bn_relu_backward grad_y shape": (
        lambda d: _conv_bw(d, grad_y=_g(2, 4, 8, 7, device=d)),
        r"unetx.conv_bn_relu_backward: expected grad_y of shape \[2, 4, 8, 8\] \(the forward's output\), "
        r"got \[2, 4, 8, 7\]",
    ),
    "conv_bn_relu_backward y shape": (
        lambda d: _conv_bw(d, y=_g(2, 4, 7, 8, device=d)),
        r"unetx.conv_bn_relu_backward: expected y of shape \[2, 4, 8, 8\] \(the forward's output\), "
        r"got \[2, 4, 7, 8\]",
    ),
    "conv_bn_relu_backward relu y shape": (
        lambda d: _conv_bw(d, y=_g(2, 4, 8, 9, device=d), grad_var=None, relu=True),
        r"expected y of shape \[2, 4, 8, 8\] .*got \[2, 4, 8, 9\]",
    ),
    "conv_bn_relu_backward float64 y": (
        lambda d: _conv_bw(d, y=_g(2, 4, 8, 8, dtype=torch.float64, device=d)),
        r"unetx.conv_bn_relu_backward: x is Float but y is Double",
    ),
    "conv_bn_relu_backward float64 grad_y": (
        lambda d: _conv_bw(d, grad_y=_g(2, 4, 8, 8, dtype=torch.float64, device=d)),
        r"unetx.conv_bn_relu_backward: x is Float but grad_y is Double",
    ),
    "conv_bn_relu_backward mean shape": (
        lambda d: _conv_bw(d, mean=_g(3, device=d)),
        r"unetx.conv_bn_relu_backward: expected mean of shape \[4\] \(one value per channel\), got \[3\]",
    ),
    "conv_bn_relu_backward grad_var shape": (
        lambda d: _conv_bw(d, grad_var=_g(5, device=d)),
        r"unetx.conv_bn_relu_backward: expected grad_var of shape \[4\] .*got \[5\]",
    ),
}


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", list(BACKWARD_CASES), ids=str)
def test_backward_op_rejects_a_bad_argument(case, device):
    call, message = BACKWARD_CASES[case]
    with pytest.raises(RuntimeError, match=message):
        call(device)


MIXED_DEVICE_CASES = {
    # one argument on meta, the rest on the CPU: the Meta key wins, so the fake impl must refuse the mix
    "bn_relu_backward grad": (
        lambda: torch.ops.unetx.bn_relu_backward(_g(2, 3, 4, 4, device="meta"), _g(2, 3, 4, 4), vec(3), vec(3)),
        r"unetx.bn_relu_backward: y is on cpu but grad is on meta",
    ),
    "bn_relu_backward mean": (
        lambda: torch.ops.unetx.bn_relu_backward(_g(2, 3, 4, 4), _g(2, 3, 4, 4), vec(3), vec(3), vec(3, "meta")),
        r"unetx.bn_relu_backward: y is on cpu but mean is on meta",
    ),
    "bn_relu_pool_backward grad_p": (
        lambda: torch.ops.unetx.bn_relu_pool_backward(
            _g(2, 3, 4, 4), _g(2, 3, 2, 2, device="meta"), _g(2, 3, 4, 4), vec(3), vec(3)
        ),
        r"unetx.bn_relu_pool_backward: y is on cpu but grad_p is on meta",
    ),
    "bn_relu_pool_backward scale": (
        lambda: torch.ops.unetx.bn_relu_pool_backward(
            _g(2, 3, 4, 4), _g(2, 3, 2, 2), _g(2, 3, 4, 4), vec(3, "meta"), vec(3)
        ),
        r"unetx.bn_relu_pool_backward: y is on cpu but scale is on meta",
    ),
    "conv_bn_relu_backward grad_y": (
        lambda: _conv_bw("cpu", grad_y=_g(2, 4, 8, 8, device="meta")),
        r"unetx.conv_bn_relu_backward: x is on cpu but grad_y is on meta",
    ),
    "conv_bn_relu_backward y": (
        lambda: _conv_bw("cpu", y=_g(2, 4, 8, 8, device="meta")),
        r"unetx.conv_bn_relu_backward: x is on cpu but y is on meta",
    ),
    "conv_bn_relu_backward mean": (
        lambda: _conv_bw("cpu", mean=_g(4, device="meta")),
        r"unetx.conv_bn_relu_backward: x is on cpu but mean is on meta",
    ),
    "conv_bn_relu_backward grad_var": (lambda: _conv_bw("cpu", grad_var=_g(4, device="meta")), r"grad_var is on meta"),
}


@pytest.mark.parametrize("case", list(MIXED_DEVICE_CASES), ids=str)
def test_backward_op_rejects_mixed_devices(case):
    call, message = MIXED_DEVICE_CASES[case]
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.filterwarnings("ignore:unetx. no unetx kernels")
@pytest.mark.parametrize(
    "case",
    [
        "bn_relu_backward grad shape",
        "bn_relu_backward float64 y, float32 grad",
        "bn_relu_pool_backward grad_p shape",
        "upsample_concat_backward odd grad",
        "conv_bn_relu_backward y shape",
        "conv_bn_relu_backward float64 grad_y",
    ],
)
def test_fallback_backward_rejects_a_bad_argument(case, monkeypatch):
    """The stock fallback (CUDA without unetx kernels) checks the backward ops' arguments as the kernels do."""
    call, message = BACKWARD_CASES[case]
    for name, fn in ops.FALLBACKS.items():
        monkeypatch.setattr(torch.ops.unetx, name, _Direct(fn), raising=False)
    with pytest.raises(RuntimeError, match=message):
        call("cpu")


class _Direct:
    """Calls a fallback function where the test calls torch.ops.unetx.<op>."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

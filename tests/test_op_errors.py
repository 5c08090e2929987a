"""Bad input to the unetx ops (conv_bn_relu, bn_relu, bn_relu_pool, avg_pool2x2, upsample_concat): each is
rejected at the boundary with a message naming the offending sizes, dtypes, devices or values."""

from __future__ import annotations

import pytest
import torch

import unetx
import unetx.layers
from unetx import ops
from unetx import reference as ref
from conftest import randn

OTHER_DEVICE = "cuda" if torch.cuda.is_available() else "meta"


def on_other_device(name: str) -> str:
    return rf"{name} is on {OTHER_DEVICE}"


def x(*shape, dtype=torch.float32, device="cpu"):
    return randn(*shape, dtype=dtype, device=device)


def vec(c, device="cpu", dtype=torch.float32):
    return randn(c, device=device, dtype=dtype).abs() + 0.5


CASES = {
    # wrong rank
    "conv_bn_relu x 3-D": (lambda: ops.conv_bn_relu(x(3, 8, 8), x(4, 3, 3, 3)),
                           r"conv_bn_relu: expected x to be a 4-D .* got shape \[3, 8, 8\]"),
    "conv_bn_relu weight 3-D": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3)),
                                r"conv_bn_relu: expected a 4-D weight, got shape \[4, 3, 3\]"),
    "conv_bn_relu x2 5-D": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 5, 3, 3), x2=x(2, 2, 4, 4, 1),
                                                     x2_mode="nearest"),
                            r"expected x2 to be a 4-D .* got shape \[2, 2, 4, 4, 1\]"),
    "bn_relu y 2-D": (lambda: ops.bn_relu(x(3, 8), vec(3), vec(3)), r"bn_relu: expected y to be a 4-D .* \[3, 8\]"),
    "bn_relu_pool y 3-D": (lambda: ops.bn_relu_pool(x(3, 8, 8), vec(3), vec(3)), r"bn_relu_pool: .*\[3, 8, 8\]"),
    "avg_pool2x2 x 3-D": (lambda: ops.avg_pool2x2(x(3, 8, 8)), r"avg_pool2x2: expected x to be a 4-D .*\[3, 8, 8\]"),
    "upsample_concat skip 3-D": (lambda: ops.upsample_concat(x(3, 8, 8), x(2, 3, 4, 4)),
                                 r"upsample_concat: expected skip to be a 4-D .*\[3, 8, 8\]"),
    "bn_relu scale 2-D": (lambda: ops.bn_relu(x(2, 3, 4, 4), vec(3).view(1, 3), vec(3)),
                          r"expected scale of shape \[3\] \(one value per channel\), got \[1, 3\]"),
    # mismatched dtypes
    "conv_bn_relu x vs weight dtype": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3, dtype=torch.float64)),
                                       r"x is Float but weight is Double"),
    "conv_bn_relu x vs x2 dtype": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 5, 3, 3),
                                                            x2=x(2, 2, 4, 4, dtype=torch.bfloat16), x2_mode="nearest"),
                                   r"x is Float but x2 is BFloat16"),
    "conv_bn_relu bias dtype": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3), x(4, dtype=torch.float64)),
                                r"x is Float but bias is Double"),
    "upsample_concat dtype": (lambda: ops.upsample_concat(x(2, 3, 8, 8), x(2, 3, 4, 4, dtype=torch.float64)),
                              r"skip is Float but x is Double"),
    "integer input": (lambda: ops.avg_pool2x2(torch.ones(2, 3, 4, 4, dtype=torch.int64)),
                      r"expected x to be a floating-point tensor, got Long"),
    "integer scale": (lambda: ops.bn_relu(x(2, 3, 4, 4), torch.ones(3, dtype=torch.int64), vec(3)),
                      r"expected scale to be floating-point, got Long"),
    # mismatched devices (cuda vs cpu where there is a GPU; else meta vs cpu, which dispatches to the fake impls)
    "conv_bn_relu weight device": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3, device=OTHER_DEVICE)),
                                   on_other_device("weight")),
    "conv_bn_relu x_scale device": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3), x_scale=vec(3, OTHER_DEVICE),
                                                             x_shift=vec(3)),
                                    on_other_device("x_scale")),
    "conv_bn_relu x2 device": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 5, 3, 3), x_pool=False,
                                                        x2=x(2, 2, 4, 4, device=OTHER_DEVICE), x2_mode="nearest"),
                               on_other_device("x2")),
    "bn_relu scale device": (lambda: ops.bn_relu(x(2, 3, 4, 4), vec(3, OTHER_DEVICE), vec(3)),
                             on_other_device("scale")),
    "bn_relu y device": (lambda: ops.bn_relu(x(2, 3, 4, 4, device=OTHER_DEVICE), vec(3), vec(3)),
                         rf"(y is on {OTHER_DEVICE}|the input is on {OTHER_DEVICE})"),
    "bn_relu_pool mean device": (lambda: ops.bn_relu_pool(x(2, 3, 4, 4), vec(3), vec(3), vec(3, OTHER_DEVICE)),
                                 on_other_device("mean")),
    "upsample_concat device": (lambda: ops.upsample_concat(x(2, 3, 8, 8), x(2, 3, 4, 4, device=OTHER_DEVICE)),
                               on_other_device("x")),
    # channel mismatches
    "conv_bn_relu weight channels": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 5, 3, 3)),
                                     r"weight \[4, 5, 3, 3\] expects 5 input channels, but x has 3"),
    "conv_bn_relu weight channels with x2": (
        lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 6, 3, 3), x2=x(2, 4, 4, 4), x2_mode="nearest"),
        r"weight \[4, 6, 3, 3\] expects 6 input channels, but x has 3 and x2 has 4 \(total 7\)"),
    "conv_bn_relu transposed weight channels": (
        lambda: ops.conv_bn_relu(x(2, 3, 4, 4), x(5, 2, 2, 2), transposed=True, stats=False),
        r"weight \[5, 2, 2, 2\] expects 5 input channels, but x has 3"),
    "conv_bn_relu x_scale channels": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3), x_scale=vec(5),
                                                               x_shift=vec(3)),
                                      r"expected x_scale of shape \[3\] \(one value per channel\), got \[5\]"),
    "conv_bn_relu x_mean channels": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3), x_scale=vec(3),
                                                              x_shift=vec(3), x_mean=vec(2)),
                                     r"expected x_mean of shape \[3\] .*got \[2\]"),
    "conv_bn_relu bias channels": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3), x(3)),
                                   r"expected bias of shape \[4\], got \[3\]"),
    "conv_bn_relu even kernel": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 2, 2)),
                                 r"'same' convolution needs an odd kernel size, got 2"),
    "conv_bn_relu x_scale without x_shift": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3), x_scale=vec(3)),
                                             r"x_scale and x_shift must be given together"),
    "conv_bn_relu x_mean without x_scale": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 3, 3, 3), x_mean=vec(3)),
                                            r"x_mean needs x_scale and x_shift"),
    "bn_relu shift channels": (lambda: ops.bn_relu(x(2, 3, 4, 4), vec(3), vec(4)),
                               r"bn_relu: expected shift of shape \[3\] .*got \[4\]"),
    "bn_relu mean channels": (lambda: ops.bn_relu(x(2, 7, 4, 4), vec(7), vec(7), vec(5)),
                              r"bn_relu: expected mean of shape \[7\] .*got \[5\]"),
    # skip vs upsampled spatial size
    "upsample_concat spatial": (lambda: ops.upsample_concat(x(2, 3, 8, 8), x(2, 3, 5, 4)),
                                r"skip \[2, 3, 8, 8\] does not match x \[2, 3, 5, 4\] upsampled 2x "
                                r"\(expected skip of shape \[2, \*, 10, 8\]\)"),
    "upsample_concat batch": (lambda: ops.upsample_concat(x(2, 3, 8, 8), x(3, 3, 4, 4)),
                              r"skip \[2, 3, 8, 8\] does not match x \[3, 3, 4, 4\]"),
    "upsample_concat none-mode spatial": (lambda: ops.upsample_concat(x(2, 3, 8, 8), x(2, 3, 4, 4), "none"),
                                          r"skip \[2, 3, 8, 8\] does not match x \[2, 3, 4, 4\] upsampled 1x"),
    "conv_bn_relu x2 spatial": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 6, 3, 3), x2=x(2, 3, 5, 4),
                                                         x2_mode="bilinear"),
                                r"x2 of shape \[2, 3, 5, 4\] upsampled 2x does not match the skip input's spatial "
                                r"size \[2, \*, 8, 8\]"),
    "conv_bn_relu x2 spatial after pool": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 6, 3, 3), x_pool=True,
                                                                    x2=x(2, 3, 4, 4), x2_mode="nearest"),
                                           r"x2 of shape \[2, 3, 4, 4\] upsampled 2x does not match .*\[2, \*, 4, 4\]"),
    # odd spatial size for pooling
    "avg_pool2x2 odd": (lambda: ops.avg_pool2x2(x(2, 3, 7, 8)),
                        r"2x2 pooling needs an even height and width, got input of shape \[2, 3, 7, 8\]"),
    "bn_relu_pool odd": (lambda: ops.bn_relu_pool(x(2, 3, 8, 9), vec(3), vec(3)),
                         r"bn_relu_pool: 2x2 pooling needs an even .*\[2, 3, 8, 9\]"),
    "conv_bn_relu x_pool odd": (lambda: ops.conv_bn_relu(x(2, 3, 7, 9), x(4, 3, 3, 3), x_pool=True),
                                r"conv_bn_relu: 2x2 pooling needs an even .*\[2, 3, 7, 9\]"),
    "conv_bn_relu stats and relu": (lambda: ops.conv_bn_relu(x(2, 3, 4, 4), x(4, 3, 3, 3), stats=True, relu=True),
                                    r"stats .* and relu .* exclude each other"),
    # upsampling mode
    "upsample_concat mode": (lambda: ops.upsample_concat(x(2, 3, 8, 8), x(2, 3, 4, 4), "bicubic"),
                             r"upsampling mode must be 'none', 'nearest' or 'bilinear', got 'bicubic'"),
    "conv_bn_relu x2_mode": (lambda: ops.conv_bn_relu(x(2, 3, 8, 8), x(4, 6, 3, 3), x2=x(2, 3, 4, 4),
                                                      x2_mode="Nearest"),
                             r"upsampling mode must be 'none', 'nearest' or 'bilinear', got 'Nearest'"),
}


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_bad_input_is_rejected_with_the_offending_value(case):
    call, message = CASES[case]
    with pytest.raises(RuntimeError, match=message):
        call()


# one value per channel in a training batch: ValueError, as nn.BatchNorm2d raises (code written against stock
# catches ValueError)
ONE_VALUE_CASES = {
    "conv_bn_relu 1x1 batch stats": (lambda: ops.conv_bn_relu(x(1, 3, 1, 1), x(4, 3, 3, 3), stats=True),
                                     r"Expected more than 1 value per channel when training, got input size "
                                     r"\[1, 4, 1, 1\]"),
    "conv_bn_relu pooled to 1x1 stats": (lambda: ops.conv_bn_relu(x(1, 3, 2, 2), x(4, 3, 1, 1), x_pool=True),
                                         r"more than 1 value per channel .*\[1, 4, 1, 1\]"),
    "fallback conv_bn_relu 1x1 batch stats": (
        lambda: ops.FALLBACKS["conv_bn_relu"](x(1, 3, 1, 1), None, None, False, None, "none", x(4, 3, 3, 3), None,
                                              False, True, False),
        r"Expected more than 1 value per channel when training, got input size \[1, 4, 1, 1\]"),
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
    fused = unetx.layers.ConvBNReLU(3, 4)
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
            torch.ops.unetx.conv_bn_relu_backward(x(2, 4, 8, 8), None, None, x(2, 3, 8, 8), None, None, False, None,
                                                  "none", x(4, 5, 3, 3), False, False, x(2, 4, 8, 8), x(4), False,
                                                  [True, True, True, True])
    else:
        with pytest.raises(RuntimeError, match=r"skip_channels=9 out of range for grad \[2, 6, 8, 8\]"):
            torch.ops.unetx.upsample_concat_backward(x(2, 6, 8, 8), 9, "nearest")


FALLBACK_DEVICE_CASES = {
    "conv_bn_relu": (lambda d: ops.FALLBACKS["conv_bn_relu"](x(2, 3, 8, 8), None, None, False, None, "none",
                                                             x(4, 3, 3, 3, device=d), None, False, True, False),
                     "weight"),
    "bn_relu": (lambda d: ops.FALLBACKS["bn_relu"](x(2, 3, 4, 4), vec(3), vec(3, d)), "shift"),
    "bn_relu_pool": (lambda d: ops.FALLBACKS["bn_relu_pool"](x(2, 3, 4, 4), vec(3, d), vec(3)), "scale"),
    "upsample_concat": (lambda d: ops.FALLBACKS["upsample_concat"](x(2, 3, 8, 8), x(2, 3, 4, 4, device=d), "nearest"),
                        "x"),
}


@pytest.mark.filterwarnings("ignore:unetx. no unetx kernels")
@pytest.mark.parametrize("op_name", list(FALLBACK_DEVICE_CASES))
def test_fallback_names_the_mismatched_device(op_name):
    """The stock fallback (CUDA without unetx kernels) raises the kernels' device message, not a stock op's."""
    call, name = FALLBACK_DEVICE_CASES[op_name]
    with pytest.raises(RuntimeError, match=rf"{op_name}: .* but {name} is on meta; move both to the same device"):
        call("meta")

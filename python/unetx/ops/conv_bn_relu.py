"""unetx.conv_bn_relu: the fused layer. Input stage (normalise + ReLU of the previous layer, 2x2 pool, concatenate an
upsampled second input) -> convolution ('same' or a stride-k transposed one) -> the batch statistics of its output.

Kernels: csrc/conv_bn_relu.cpp over csrc/cpu/*.cpp and csrc/cuda/*.cu; reference: unetx.ops.reference.conv_bn_relu
and conv_bn_relu_backward; tests: tests/test_conv_bn_relu.py; bench: bench/bench_ops.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference as ref
from ._common import (
    _acc_dtype,
    _check_4d,
    _check_devices,
    _check_even,
    _check_grad,
    _check_mode,
    _check_same,
    _check_vector,
    _empty,
    _layout,
    _ops,
    _shape,
    _warn_fallback,
)


def conv_bn_relu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    x_scale: Tensor | None = None,
    x_shift: Tensor | None = None,
    x_pool: bool = False,
    x2: Tensor | None = None,
    x2_mode: str = "none",
    transposed: bool = False,
    stats: bool = True,
    relu: bool = False,
    x_mean: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused layer; `unetx.ops.reference.conv_bn_relu` says exactly what it computes. Returns (y, mean, var).

    The input stage applies relu((x - x_mean) * x_scale + x_shift) when x_scale is given (x_mean None = 0), then the
    2x2 average pool (x_pool), then concatenates upsample(x2) (x2_mode "none", "nearest" or "bilinear") on channels.
    With stats, mean and var are y's biased batch statistics per channel; with relu, y is relu'd (eval mode, with
    BatchNorm folded into weight and bias). Under torch.autocast it casts like a convolution (unetx.ops.autocast)."""
    return _ops.conv_bn_relu(x, x_scale, x_shift, x_pool, x2, x2_mode, weight, bias, transposed, stats, relu, x_mean)


# ----------------------------------------------------------------------------------- fake (meta) impls
def _conv_out_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    # ATen's convolutions produce channels_last when the input (or the weight) is channels_last.
    if _layout(x) == torch.channels_last or _layout(weight) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


def _args_conv_bn_relu(x, x_scale, x_shift, x_pool, x2, x2_mode, weight, bias, transposed, x_mean) -> tuple:
    """The forward's checks (csrc/conv_bn_relu.cpp check_args); returns the output's shape."""
    op = "unetx.conv_bn_relu"
    _check_4d(x, op, "x")
    _check_devices(op, "x", x, weight=weight, bias=bias, x_scale=x_scale, x_shift=x_shift, x_mean=x_mean, x2=x2)
    torch._check((x_scale is None) == (x_shift is None), lambda: f"{op}: x_scale and x_shift must be given together")
    for name, v in (("x_scale", x_scale), ("x_shift", x_shift)):
        if v is not None:
            _check_vector(op, name, v, x.shape[1], x)
    if x_pool:
        _check_even(x, op)
    n, c1, h, w = x.shape
    if x_pool:
        h, w = h // 2, w // 2
    f = _check_mode(x2_mode, op)
    c2 = 0
    if x2 is not None:
        _check_4d(x2, op, "x2")
        _check_same(op, "x", x, "x2", x2)
        torch._check(
            x2.shape[0] == n and f * x2.shape[2] == h and f * x2.shape[3] == w,
            lambda: (
                f"{op}: x2 of shape {_shape(x2)} upsampled {f}x does not match the skip input's spatial "
                f"size [{n}, *, {h}, {w}]"
            ),
        )
        c2 = x2.shape[1]
    torch._check(weight.dim() == 4, lambda: f"{op}: expected a 4-D weight, got shape {_shape(weight)}")
    _check_same(op, "x", x, "weight", weight)
    k = weight.shape[3]
    torch._check(weight.shape[2] == k, lambda: f"{op}: expected a square kernel, got weight {_shape(weight)}")
    in_ch, out_ch = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
    torch._check(
        in_ch == c1 + c2,
        lambda: (
            f"{op}: weight {_shape(weight)} expects {in_ch} input channels, but x has "
            f"{c1}" + (f" and x2 has {c2}" if c2 else "") + f" (total {c1 + c2})"
        ),
    )
    torch._check(transposed or k % 2 == 1, lambda: f"{op}: 'same' convolution needs an odd kernel size, got {k}")
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == out_ch,
            lambda: f"{op}: expected bias of shape [{out_ch}], got {_shape(bias)}",
        )
        _check_same(op, "x", x, "bias", bias)
    if x_mean is not None:
        torch._check(x_scale is not None, lambda: f"{op}: x_mean needs x_scale and x_shift")
        _check_vector(op, "x_mean", x_mean, x.shape[1], x)
    s = k if transposed else 1
    return n, out_ch, h * s, w * s


def _args_conv_bn_relu_backward(grad_y, grad_mean, grad_var, x, weight, transposed, y, mean, relu, out) -> None:
    """The backward's own arguments (csrc/conv_bn_relu.cpp check_backward_args)."""
    op = "unetx.conv_bn_relu_backward"
    _check_grad(op, "grad_y", grad_y, "x", x, out, " (the forward's output)")
    _check_devices(op, "x", x, y=y, mean=mean)
    if grad_mean is not None or grad_var is not None or relu:
        _check_grad(op, "y", y, "x", x, out, " (the forward's output)")
    for name, v in (("grad_mean", grad_mean), ("grad_var", grad_var)):
        if v is not None:
            _check_vector(op, name, v, out[1], x)
    if grad_var is not None:
        _check_vector(op, "mean", mean, out[1], x)


@torch.library.register_fake("unetx::conv_bn_relu")
def _(x, x_scale, x_shift, x_pool, x2, x2_mode, weight, bias, transposed, stats, relu, x_mean=None):
    n, cout, h, w = _args_conv_bn_relu(x, x_scale, x_shift, x_pool, x2, x2_mode, weight, bias, transposed, x_mean)
    y = _empty((n, cout, h, w), x, _conv_out_format(x, weight))
    if stats:
        acc = _acc_dtype(x.dtype)
        return y, x.new_empty((cout,), dtype=acc), x.new_empty((cout,), dtype=acc)
    return y, x.new_empty((0,)), x.new_empty((0,))


@torch.library.register_fake("unetx::conv_bn_relu_backward")
def _(
    grad_y,
    grad_mean,
    grad_var,
    x,
    x_scale,
    x_shift,
    x_pool,
    x2,
    x2_mode,
    weight,
    has_bias,
    transposed,
    y,
    mean,
    relu,
    output_mask,
    x_mean=None,
):
    out = _args_conv_bn_relu(x, x_scale, x_shift, x_pool, x2, x2_mode, weight, None, transposed, x_mean)
    _args_conv_bn_relu_backward(grad_y, grad_mean, grad_var, x, weight, transposed, y, mean, relu, out)
    fmt = _layout(x)
    gx = gs = gt = gx2 = gw = gb = gm = None
    if output_mask[0]:
        gx = _empty(x.shape, x, fmt)
        if x_scale is not None:
            gs, gt = torch.empty_like(x_scale), torch.empty_like(x_shift)
        if x_mean is not None:
            gm = torch.empty_like(x_mean)
    if output_mask[1] and x2 is not None:
        gx2 = _empty(x2.shape, x2, fmt)
    if output_mask[2]:
        gw = torch.empty_like(weight)  # the parameter's own strides (see the kernel)
    if has_bias and output_mask[3]:
        gb = weight.new_empty((weight.shape[1] if transposed else weight.shape[0],))
    return gx, gs, gt, gx2, gw, gb, gm


# -------------------------------------------------------------------------------------------- autograd
def _conv_bn_relu_setup(ctx, inputs, output):
    x, x_scale, x_shift, x_pool, x2, x2_mode, weight, bias, transposed, stats, relu, *rest = inputs
    x_mean = rest[0] if rest else None  # a trailing x_mean=None may be left out of inputs
    y, mean, _ = output
    # y is saved only where backward reads it; x is the previous layer's y (already saved there): one
    # activation-sized tensor per layer.
    keep_y = stats or relu
    ctx.save_for_backward(x, x_scale, x_shift, x2, weight, y if keep_y else None, mean if stats else None, x_mean)
    ctx.flags = (x_pool, x2_mode, bias is not None, transposed, stats, relu)


def _conv_bn_relu_backward(ctx, grad_y, grad_mean, grad_var):
    x, x_scale, x_shift, x2, weight, y, mean, x_mean = ctx.saved_tensors
    x_pool, x2_mode, has_bias, transposed, stats, relu = ctx.flags
    # needs_input_grad omits trailing arguments left at their schema default (x_mean=None)
    need = tuple(ctx.needs_input_grad) + (False,) * (12 - len(ctx.needs_input_grad))
    mask = [need[0] or need[1] or need[2] or need[11], need[4], need[6], need[7]]
    if y is None:
        y = grad_y.new_empty(0)
    if mean is None:
        mean = grad_y.new_empty(0)
    gx, gs, gt, gx2, gw, gb, gm = _ops.conv_bn_relu_backward(
        grad_y,
        grad_mean if stats else None,
        grad_var if stats else None,
        x,
        x_scale,
        x_shift,
        x_pool,
        x2,
        x2_mode,
        weight,
        has_bias,
        transposed,
        y,
        mean,
        relu,
        mask,
        x_mean,
    )
    return (gx, gs, gt, None, gx2, None, gw, gb, None, None, None, gm)[: len(ctx.needs_input_grad)]


torch.library.register_autograd("unetx::conv_bn_relu", _conv_bn_relu_backward, setup_context=_conv_bn_relu_setup)


# ------------------------------------------------------------------------------------------- fallback
def _fb_conv_bn_relu(x, x_scale, x_shift, x_pool, x2, x2_mode, weight, bias, transposed, stats, relu, x_mean=None):
    _args_conv_bn_relu(x, x_scale, x_shift, x_pool, x2, x2_mode, weight, bias, transposed, x_mean)
    _warn_fallback(x.device)
    fmt = _layout(x)
    x = x.contiguous(memory_format=fmt)
    # float32 scale/shift/mean on bfloat16 data (autocast) promote the input stage; the kernels write it in x's dtype
    a = ref.input_stage(x, x_scale, x_shift, x_pool, x2, x2_mode, x_mean).to(x.dtype)
    y, _, _ = ref.conv_bn_relu(a, None, None, False, None, "none", weight, bias, transposed, False, relu)
    y = y.contiguous(memory_format=_conv_out_format(x, weight))
    if not stats:
        return y, y.new_empty(0), y.new_empty(0)
    if y.numel() // y.shape[1] <= 1:  # as the kernels and nn.BatchNorm2d
        raise ValueError(
            f"unetx.conv_bn_relu: Expected more than 1 value per channel when training, got input size "
            f"{list(y.shape)} (batch statistics need batch * height * width > 1)"
        )
    var, mean = torch.var_mean(y.to(_acc_dtype(y.dtype)), dim=(0, 2, 3), correction=0)
    return y, mean, var


def _fb_conv_bn_relu_backward(
    grad_y,
    grad_mean,
    grad_var,
    x,
    x_scale,
    x_shift,
    x_pool,
    x2,
    x2_mode,
    weight,
    has_bias,
    transposed,
    y,
    mean,
    relu,
    output_mask,
    x_mean=None,
):
    out = _args_conv_bn_relu(x, x_scale, x_shift, x_pool, x2, x2_mode, weight, None, transposed, x_mean)
    _args_conv_bn_relu_backward(grad_y, grad_mean, grad_var, x, weight, transposed, y, mean, relu, out)
    # Mixed precision (bfloat16 data, float32 statistics and vectors): the reference promotes part of the
    # computation, so run all of it in the promoted dtype and cast each gradient back to its input's dtype.
    dt = x.dtype
    for v in (x_scale, x_shift, x_mean, grad_mean, grad_var, mean if mean.numel() else None):
        dt = dt if v is None else torch.promote_types(dt, v.dtype)
    up = lambda t: None if t is None else t.to(dt)
    gx, gs, gt, gx2, gw, gb, gm = ref.conv_bn_relu_backward(
        up(grad_y),
        grad_mean,
        grad_var,
        up(x),
        x_scale,
        x_shift,
        x_pool,
        up(x2),
        x2_mode,
        up(weight),
        has_bias,
        transposed,
        up(y) if y.numel() else y,
        mean,
        relu,
        x_mean,
    )
    gw = torch.empty_like(weight).copy_(gw) if output_mask[2] else None
    gb = gb.to(weight.dtype).contiguous() if (output_mask[3] and gb is not None) else None
    fmt = _layout(x)
    gx = gx.to(x.dtype).contiguous(memory_format=fmt) if output_mask[0] else None
    if output_mask[0] and x_scale is not None:
        gs, gt = gs.to(x_scale.dtype), gt.to(x_shift.dtype)
        gm = None if x_mean is None else gm.to(x_mean.dtype)
    else:
        gs, gt, gm = None, None, None
    gx2 = gx2.to(x2.dtype).contiguous(memory_format=fmt) if (output_mask[1] and gx2 is not None) else None
    return gx, gs, gt, gx2, gw, gb, gm


FALLBACKS = {"conv_bn_relu": _fb_conv_bn_relu, "conv_bn_relu_backward": _fb_conv_bn_relu_backward}

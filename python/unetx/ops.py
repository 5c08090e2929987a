"""The unetx ops: thin wrappers over torch.ops.unetx.*, their fake (meta) implementations, their autograd
formulas (each backward is itself a registered op), and the stock-PyTorch fallback used on devices that have no
unetx kernel.

Ops (written once for every device in csrc/ops.cpp and csrc/conv_bn_relu.cpp over the kernels of csrc/cpu/<op>.cpp
and csrc/cuda/<op>.cu; references in unetx.reference):
  conv_bn_relu      the fused layer: input stage (normalise + ReLU of the previous layer, pool, concat an
                    upsampled second input) -> convolution -> batch statistics
  bn_relu           relu(y * scale + shift)
  bn_relu_pool      (relu(y * scale + shift), its 2x2 average pool) in one pass
  avg_pool2x2       2x2 average pooling, stride 2
  upsample_concat   cat([skip, upsample2x(x)], dim=1) in one pass
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from . import reference as ref
from ._extension import BUILD_INFO, _C

_ops = torch.ops.unetx


# ------------------------------------------------------------------------------------------ wrappers
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
    """The fused layer; see `unetx.reference.conv_bn_relu` for exactly what it computes. Returns (y, mean, var).

    The input stage applies relu((x - x_mean) * x_scale + x_shift) when x_scale is given (x_mean None = 0)."""
    return _ops.conv_bn_relu(x, x_scale, x_shift, x_pool, x2, x2_mode, weight, bias, transposed, stats, relu, x_mean)


def bn_relu(y: Tensor, scale: Tensor, shift: Tensor, mean: Tensor | None = None) -> Tensor:
    """relu((y - mean) * scale + shift) per channel (mean None = 0)."""
    return _ops.bn_relu(y, scale, shift, mean)


def bn_relu_pool(y: Tensor, scale: Tensor, shift: Tensor, mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return _ops.bn_relu_pool(y, scale, shift, mean)


def avg_pool2x2(x: Tensor) -> Tensor:
    return _ops.avg_pool2x2(x)


def upsample_concat(skip: Tensor, x: Tensor, mode: str = "nearest") -> Tensor:
    return _ops.upsample_concat(skip, x, mode)


# ----------------------------------------------------------------------------------- fake (meta) impls
def _layout(t: Tensor) -> torch.memory_format:
    return suggest_memory_format(t)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(shape, like: Tensor, fmt: torch.memory_format, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


# Argument checks, the same as the kernels' (csrc/common/checks.h, csrc/ops.cpp), with the same messages: every op,
# forward and backward, checks every argument's device, dtype and shape in its fake impl and in its fallback too
# (a call mixing meta and CPU tensors lands in the fake impl, a CUDA one without CUDA kernels in the fallback).
_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16", torch.float16: "Half",
                torch.int64: "Long", torch.int32: "Int", torch.bool: "Bool", torch.uint8: "Byte"}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _shape(t: Tensor) -> list:
    return list(t.shape)


def _check_4d(t: Tensor, op: str, name: str) -> None:
    torch._check(t.dim() == 4, lambda: f"{op}: expected {name} to be a 4-D (N, C, H, W) tensor, got shape {_shape(t)}")
    torch._check(t.is_floating_point(),
                 lambda: f"{op}: expected {name} to be a floating-point tensor, got {_dtype_name(t.dtype)}")


def _check_devices(op: str, main: str, first: Tensor, /, **others: Tensor | None) -> None:
    # The Meta key outranks CPU: a call mixing meta and CPU tensors lands in the fake impl, never in the kernels'
    # checks; a CUDA one without CUDA kernels lands in the fallback. Both check here, with the kernels' message.
    for name, t in others.items():
        if t is not None:
            torch._check(t.device == first.device, lambda: f"{op}: {main} is on {first.device} but {name} is on "
                                                            f"{t.device}; move both to the same device")


def _check_same(op: str, na: str, a: Tensor, nb: str, b: Tensor) -> None:
    _check_devices(op, na, a, **{nb: b})
    torch._check(a.dtype == b.dtype, lambda: f"{op}: {na} is {_dtype_name(a.dtype)} but {nb} is "
                                             f"{_dtype_name(b.dtype)}; use one dtype (or torch.autocast)")


def _check_vector(op: str, name: str, v: Tensor, channels, like: Tensor) -> None:
    torch._check(v.dim() == 1 and v.shape[0] == channels,
                 lambda: f"{op}: expected {name} of shape [{channels}] (one value per channel), got {_shape(v)}")
    _check_devices(op, "the input", like, **{name: v})
    torch._check(v.is_floating_point(),
                 lambda: f"{op}: expected {name} to be floating-point, got {_dtype_name(v.dtype)}")


def _check_grad(op: str, name: str, grad: Tensor, like_name: str, like: Tensor, shape, note: str = "") -> None:
    """A gradient has the shape its forward produced, and the device and dtype of `like`."""
    torch._check(grad.dim() == len(shape) and all(a == b for a, b in zip(grad.shape, shape)),
                 lambda: f"{op}: expected {name} of shape {list(shape)}{note}, got {_shape(grad)}")
    _check_same(op, like_name, like, name, grad)


def _check_even(x: Tensor, op: str) -> None:
    torch._check(x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0,
                 lambda: f"{op}: 2x2 pooling needs an even height and width, got input of shape {_shape(x)}; pad or "
                         "crop to even size (unetx.UNet pads its input for you)")


def _check_mode(mode: str, op: str) -> int:
    torch._check(mode in ("none", "nearest", "bilinear"),
                 lambda: f"{op}: upsampling mode must be 'none', 'nearest' or 'bilinear', got '{mode}'")
    return 1 if mode == "none" else 2


def _pooled(t: Tensor) -> tuple:
    n, c, h, w = t.shape
    return n, c, h // 2, w // 2


def _args_bn_relu(op: str, y: Tensor, scale: Tensor, shift: Tensor, mean: Tensor | None, pool: bool) -> None:
    _check_4d(y, op, "y")
    _check_devices(op, "y", y, scale=scale, shift=shift, mean=mean)
    for name, v in (("scale", scale), ("shift", shift), ("mean", mean)):
        if v is not None:
            _check_vector(op, name, v, y.shape[1], y)
    if pool:
        _check_even(y, op)


def _args_upsample_concat(skip: Tensor, x: Tensor, mode: str) -> None:
    op = "unetx.upsample_concat"
    f = _check_mode(mode, op)
    _check_4d(skip, op, "skip")
    _check_4d(x, op, "x")
    _check_same(op, "skip", skip, "x", x)
    torch._check(skip.shape[0] == x.shape[0] and skip.shape[2] == f * x.shape[2] and skip.shape[3] == f * x.shape[3],
                 lambda: f"{op}: skip {_shape(skip)} does not match x {_shape(x)} upsampled {f}x (expected skip of "
                         f"shape [{x.shape[0]}, *, {f * x.shape[2]}, {f * x.shape[3]}])")


def _args_upsample_concat_backward(grad: Tensor, skip_channels: int, mode: str) -> int:
    op = "unetx.upsample_concat_backward"
    f = _check_mode(mode, op)
    _check_4d(grad, op, "grad")
    torch._check(0 <= skip_channels <= grad.shape[1],
                 lambda: f"{op}: skip_channels={skip_channels} out of range for grad {_shape(grad)}")
    torch._check(grad.shape[2] % f == 0 and grad.shape[3] % f == 0,
                 lambda: f"{op}: grad {_shape(grad)} must have an even height and width for 2x upsampling")
    return f


@torch.library.register_fake("unetx::bn_relu")
def _(y, scale, shift, mean=None):
    _args_bn_relu("unetx.bn_relu", y, scale, shift, mean, pool=False)
    return _empty(y.shape, y, _layout(y))


def _activation_grads_fake(y, scale, shift, mean):
    gm = None if mean is None else torch.empty_like(mean)
    return _empty(y.shape, y, _layout(y)), torch.empty_like(scale), torch.empty_like(shift), gm


@torch.library.register_fake("unetx::bn_relu_backward")
def _(grad, y, scale, shift, mean=None):
    op = "unetx.bn_relu_backward"
    _args_bn_relu(op, y, scale, shift, mean, pool=False)
    _check_grad(op, "grad", grad, "y", y, y.shape)
    return _activation_grads_fake(y, scale, shift, mean)


@torch.library.register_fake("unetx::bn_relu_pool")
def _(y, scale, shift, mean=None):
    _args_bn_relu("unetx.bn_relu_pool", y, scale, shift, mean, pool=True)
    fmt = _layout(y)
    return _empty(y.shape, y, fmt), _empty(_pooled(y), y, fmt)


@torch.library.register_fake("unetx::bn_relu_pool_backward")
def _(grad_z, grad_p, y, scale, shift, mean=None):
    op = "unetx.bn_relu_pool_backward"
    _args_bn_relu(op, y, scale, shift, mean, pool=True)
    _check_grad(op, "grad_z", grad_z, "y", y, y.shape)
    _check_grad(op, "grad_p", grad_p, "y", y, _pooled(y))
    return _activation_grads_fake(y, scale, shift, mean)


@torch.library.register_fake("unetx::avg_pool2x2")
def _(x):
    _check_4d(x, "unetx.avg_pool2x2", "x")
    _check_even(x, "unetx.avg_pool2x2")
    return _empty(_pooled(x), x, _layout(x))


@torch.library.register_fake("unetx::avg_pool2x2_backward")
def _(grad):
    _check_4d(grad, "unetx.avg_pool2x2_backward", "grad")
    n, c, h, w = grad.shape
    return _empty((n, c, 2 * h, 2 * w), grad, _layout(grad))


@torch.library.register_fake("unetx::upsample_concat")
def _(skip, x, mode):
    _args_upsample_concat(skip, x, mode)
    n, cs, h, w = skip.shape
    return _empty((n, cs + x.shape[1], h, w), skip, _layout(skip))


@torch.library.register_fake("unetx::upsample_concat_backward")
def _(grad, skip_channels, mode):
    f = _args_upsample_concat_backward(grad, skip_channels, mode)
    n, c, h, w = grad.shape
    fmt = _layout(grad)
    return _empty((n, skip_channels, h, w), grad, fmt), _empty((n, c - skip_channels, h // f, w // f), grad, fmt)


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
        torch._check(x2.shape[0] == n and f * x2.shape[2] == h and f * x2.shape[3] == w,
                     lambda: f"{op}: x2 of shape {_shape(x2)} upsampled {f}x does not match the skip input's spatial "
                             f"size [{n}, *, {h}, {w}]")
        c2 = x2.shape[1]
    torch._check(weight.dim() == 4, lambda: f"{op}: expected a 4-D weight, got shape {_shape(weight)}")
    _check_same(op, "x", x, "weight", weight)
    k = weight.shape[3]
    torch._check(weight.shape[2] == k, lambda: f"{op}: expected a square kernel, got weight {_shape(weight)}")
    in_ch, out_ch = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
    torch._check(in_ch == c1 + c2, lambda: f"{op}: weight {_shape(weight)} expects {in_ch} input channels, but x has "
                                           f"{c1}" + (f" and x2 has {c2}" if c2 else "") + f" (total {c1 + c2})")
    torch._check(transposed or k % 2 == 1, lambda: f"{op}: 'same' convolution needs an odd kernel size, got {k}")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == out_ch,
                     lambda: f"{op}: expected bias of shape [{out_ch}], got {_shape(bias)}")
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
def _(grad_y, grad_mean, grad_var, x, x_scale, x_shift, x_pool, x2, x2_mode, weight, has_bias, transposed, y, mean,
      relu, output_mask, x_mean=None):
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
        grad_y, grad_mean if stats else None, grad_var if stats else None, x, x_scale, x_shift, x_pool, x2, x2_mode,
        weight, has_bias, transposed, y, mean, relu, mask, x_mean,
    )
    return (gx, gs, gt, None, gx2, None, gw, gb, None, None, None, gm)[: len(ctx.needs_input_grad)]


torch.library.register_autograd("unetx::conv_bn_relu", _conv_bn_relu_backward, setup_context=_conv_bn_relu_setup)


def _bn_relu_setup(ctx, inputs, output):
    y, scale, shift, *mean = inputs  # a trailing mean=None may be left out of inputs
    ctx.save_for_backward(y, scale, shift, mean[0] if mean else None)
    ctx.n_inputs = len(inputs)


def _bn_relu_backward(ctx, grad):
    y, scale, shift, mean = ctx.saved_tensors
    return _ops.bn_relu_backward(grad, y, scale, shift, mean)[: ctx.n_inputs]


torch.library.register_autograd("unetx::bn_relu", _bn_relu_backward, setup_context=_bn_relu_setup)


def _bn_relu_pool_backward(ctx, grad_z, grad_p):
    y, scale, shift, mean = ctx.saved_tensors
    return _ops.bn_relu_pool_backward(grad_z, grad_p, y, scale, shift, mean)[: ctx.n_inputs]


torch.library.register_autograd("unetx::bn_relu_pool", _bn_relu_pool_backward, setup_context=_bn_relu_setup)


def _avg_pool_backward(ctx, grad):
    return _ops.avg_pool2x2_backward(grad)


torch.library.register_autograd("unetx::avg_pool2x2", _avg_pool_backward, setup_context=lambda ctx, inputs, output: None)


def _upsample_concat_setup(ctx, inputs, output):
    skip, _, mode = inputs
    ctx.skip_channels, ctx.mode = skip.shape[1], mode


def _upsample_concat_backward(ctx, grad):
    gs, gx = _ops.upsample_concat_backward(grad, ctx.skip_channels, ctx.mode)
    return gs, gx, None


torch.library.register_autograd("unetx::upsample_concat", _upsample_concat_backward, setup_context=_upsample_concat_setup)


# ------------------------------------------------------------------- fallback: devices with no kernel
# CUDA (until its kernels are verified on a GPU and enabled), MPS, XPU: each op runs as a composition of stock
# PyTorch ops with the same semantics, so the package works everywhere. One warning per process.
_warned = False


def _cuda_hint(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    if BUILD_INFO["cuda"]:
        return "Set UNETX_CUDA_KERNELS=1 to use the compiled (not yet GPU-verified) CUDA kernels."
    return ("This unetx was built without CUDA kernels (no nvcc was found at build time); install the CUDA toolkit "
            "and reinstall unetx to compile them.")


def _warn_fallback(device: torch.device) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"unetx: no unetx kernels are enabled for {device.type}; running stock PyTorch compositions of the same ops "
            "(correct, but without the fused kernels' speed and memory savings). "
            + _cuda_hint(device),
            stacklevel=3,
        )


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
        raise ValueError(f"unetx.conv_bn_relu: Expected more than 1 value per channel when training, got input size "
                         f"{list(y.shape)} (batch statistics need batch * height * width > 1)")
    var, mean = torch.var_mean(y.to(_acc_dtype(y.dtype)), dim=(0, 2, 3), correction=0)
    return y, mean, var


def _fb_conv_bn_relu_backward(grad_y, grad_mean, grad_var, x, x_scale, x_shift, x_pool, x2, x2_mode, weight,
                              has_bias, transposed, y, mean, relu, output_mask, x_mean=None):
    out = _args_conv_bn_relu(x, x_scale, x_shift, x_pool, x2, x2_mode, weight, None, transposed, x_mean)
    _args_conv_bn_relu_backward(grad_y, grad_mean, grad_var, x, weight, transposed, y, mean, relu, out)
    # Mixed precision (bfloat16 data, float32 statistics and vectors): the reference promotes part of the
    # computation, so run all of it in the promoted dtype and cast each gradient back to its input's dtype.
    dt = x.dtype
    for v in (x_scale, x_shift, x_mean, grad_mean, grad_var, mean if mean.numel() else None):
        dt = dt if v is None else torch.promote_types(dt, v.dtype)
    up = lambda t: None if t is None else t.to(dt)  # noqa: E731
    gx, gs, gt, gx2, gw, gb, gm = ref.conv_bn_relu_backward(
        up(grad_y), grad_mean, grad_var, up(x), x_scale, x_shift, x_pool, up(x2), x2_mode, up(weight), has_bias,
        transposed, up(y) if y.numel() else y, mean, relu, x_mean,
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


def _fb_bn_relu(y, scale, shift, mean=None):
    _args_bn_relu("unetx.bn_relu", y, scale, shift, mean, pool=False)
    _warn_fallback(y.device)
    return ref.bn_relu(y, scale, shift, mean).to(y.dtype).contiguous(memory_format=_layout(y))


def _fb_bn_relu_backward(grad, y, scale, shift, mean=None):
    _args_bn_relu("unetx.bn_relu_backward", y, scale, shift, mean, pool=False)
    _check_grad("unetx.bn_relu_backward", "grad", grad, "y", y, y.shape)
    return _fb_activation_grads(grad, y, scale, shift, mean)


def _fb_activation_grads(grad, y, scale, shift, mean):
    gx, gs, gt, gm = ref.bn_relu_backward(grad, y, scale, shift, mean)
    return gx.to(y.dtype).contiguous(memory_format=_layout(y)), gs.to(scale.dtype), gt.to(shift.dtype), gm


def _fb_bn_relu_pool(y, scale, shift, mean=None):
    _args_bn_relu("unetx.bn_relu_pool", y, scale, shift, mean, pool=True)
    _warn_fallback(y.device)
    fmt = _layout(y)
    z, p = ref.bn_relu_pool(y, scale, shift, mean)
    return z.to(y.dtype).contiguous(memory_format=fmt), p.to(y.dtype).contiguous(memory_format=fmt)


def _fb_bn_relu_pool_backward(grad_z, grad_p, y, scale, shift, mean=None):
    op = "unetx.bn_relu_pool_backward"
    _args_bn_relu(op, y, scale, shift, mean, pool=True)
    _check_grad(op, "grad_z", grad_z, "y", y, y.shape)
    _check_grad(op, "grad_p", grad_p, "y", y, _pooled(y))
    return _fb_activation_grads(grad_z + ref._pool_backward(grad_p), y, scale, shift, mean)


def _fb_avg_pool2x2(x):
    _check_4d(x, "unetx.avg_pool2x2", "x")
    _check_even(x, "unetx.avg_pool2x2")
    _warn_fallback(x.device)
    return ref.avg_pool2x2(x).contiguous(memory_format=_layout(x))


def _fb_avg_pool2x2_backward(grad):
    _check_4d(grad, "unetx.avg_pool2x2_backward", "grad")
    return ref._pool_backward(grad).contiguous(memory_format=_layout(grad))


def _fb_upsample_concat(skip, x, mode):
    _args_upsample_concat(skip, x, mode)
    _warn_fallback(skip.device)
    return ref.upsample_concat(skip, x, mode).contiguous(memory_format=_layout(skip))


def _fb_upsample_concat_backward(grad, skip_channels, mode):
    f = _args_upsample_concat_backward(grad, skip_channels, mode)
    fmt = _layout(grad)
    n, c, h, w = grad.shape
    gx = ref._upsample_backward(grad[:, skip_channels:], mode, [h // f, w // f])
    # clone: with batch 1 a channel slice of grad is already dense, and outputs may not alias inputs
    gx = gx.clone(memory_format=fmt) if mode == "none" else gx.contiguous(memory_format=fmt)
    return grad[:, :skip_channels].clone(memory_format=fmt), gx


FALLBACKS = {
    "conv_bn_relu": _fb_conv_bn_relu,
    "conv_bn_relu_backward": _fb_conv_bn_relu_backward,
    "bn_relu": _fb_bn_relu,
    "bn_relu_backward": _fb_bn_relu_backward,
    "bn_relu_pool": _fb_bn_relu_pool,
    "bn_relu_pool_backward": _fb_bn_relu_pool_backward,
    "avg_pool2x2": _fb_avg_pool2x2,
    "avg_pool2x2_backward": _fb_avg_pool2x2_backward,
    "upsample_concat": _fb_upsample_concat,
    "upsample_concat_backward": _fb_upsample_concat_backward,
}

_cuda_kernels = False
if BUILD_INFO["cuda"] and os.environ.get("UNETX_CUDA_KERNELS", "0") == "1":
    _cuda_kernels = bool(_C.register_cuda_kernels())

_fallback_lib = torch.library.Library("unetx", "IMPL")
for _key in (("MPS", "XPU") if _cuda_kernels else ("CUDA", "MPS", "XPU")):
    for _name, _fn in FALLBACKS.items():
        _fallback_lib.impl(_name, _fn, _key)


def cuda_kernels_enabled() -> bool:
    """True when the compiled CUDA kernels serve CUDA tensors (opt-in with UNETX_CUDA_KERNELS=1 until verified)."""
    return _cuda_kernels

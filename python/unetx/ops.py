"""The unetx ops: thin wrappers over torch.ops.unetx.*, their fake (meta) implementations, their autograd
formulas (each backward is itself a registered op), and the stock-PyTorch fallback used on devices that have no
unetx kernel.

Ops (kernels in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu, references in unetx.reference):
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


def _check_4d(t: Tensor, op: str, name: str) -> None:
    torch._check(t.dim() == 4, lambda: f"{op}: expected {name} to be a 4-D (N, C, H, W) tensor, got shape {tuple(t.shape)}")


def _check_devices(op: str, main: str, first: Tensor, /, **others: Tensor | None) -> None:
    # The Meta key outranks CPU: a call mixing meta and CPU tensors lands in the fake impl, never in the kernels'
    # checks; a CUDA one without CUDA kernels lands in the fallback. Both check here, with the kernels' message.
    for name, t in others.items():
        if t is not None:
            torch._check(t.device == first.device, lambda: f"{op}: {main} is on {first.device} but {name} is on "
                                                            f"{t.device}; move both to the same device")


@torch.library.register_fake("unetx::bn_relu")
def _(y, scale, shift, mean=None):
    _check_4d(y, "unetx.bn_relu", "y")
    _check_devices("unetx.bn_relu", "y", y, scale=scale, shift=shift, mean=mean)
    return _empty(y.shape, y, _layout(y))


def _activation_grads_fake(y, scale, shift, mean):
    gm = None if mean is None else torch.empty_like(mean)
    return _empty(y.shape, y, _layout(y)), torch.empty_like(scale), torch.empty_like(shift), gm


@torch.library.register_fake("unetx::bn_relu_backward")
def _(grad, y, scale, shift, mean=None):
    return _activation_grads_fake(y, scale, shift, mean)


@torch.library.register_fake("unetx::bn_relu_pool")
def _(y, scale, shift, mean=None):
    _check_4d(y, "unetx.bn_relu_pool", "y")
    _check_devices("unetx.bn_relu_pool", "y", y, scale=scale, shift=shift, mean=mean)
    n, c, h, w = y.shape
    torch._check(h % 2 == 0 and w % 2 == 0, lambda: f"unetx.bn_relu_pool: needs even height and width, got {tuple(y.shape)}")
    fmt = _layout(y)
    return _empty(y.shape, y, fmt), _empty((n, c, h // 2, w // 2), y, fmt)


@torch.library.register_fake("unetx::bn_relu_pool_backward")
def _(grad_z, grad_p, y, scale, shift, mean=None):
    return _activation_grads_fake(y, scale, shift, mean)


@torch.library.register_fake("unetx::avg_pool2x2")
def _(x):
    _check_4d(x, "unetx.avg_pool2x2", "x")
    n, c, h, w = x.shape
    torch._check(h % 2 == 0 and w % 2 == 0, lambda: f"unetx.avg_pool2x2: needs even height and width, got {tuple(x.shape)}")
    return _empty((n, c, h // 2, w // 2), x, _layout(x))


@torch.library.register_fake("unetx::avg_pool2x2_backward")
def _(grad):
    n, c, h, w = grad.shape
    return _empty((n, c, 2 * h, 2 * w), grad, _layout(grad))


@torch.library.register_fake("unetx::upsample_concat")
def _(skip, x, mode):
    _check_devices("unetx.upsample_concat", "skip", skip, x=x)
    f = 1 if mode == "none" else 2
    torch._check(skip.shape[2] == f * x.shape[2] and skip.shape[3] == f * x.shape[3],
                 lambda: f"unetx.upsample_concat: skip {tuple(skip.shape)} does not match x {tuple(x.shape)} upsampled {f}x")
    n, cs, h, w = skip.shape
    return _empty((n, cs + x.shape[1], h, w), skip, _layout(skip))


@torch.library.register_fake("unetx::upsample_concat_backward")
def _(grad, skip_channels, mode):
    f = 1 if mode == "none" else 2
    n, c, h, w = grad.shape
    fmt = _layout(grad)
    return _empty((n, skip_channels, h, w), grad, fmt), _empty((n, c - skip_channels, h // f, w // f), grad, fmt)


def _conv_out_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    # ATen's convolutions produce channels_last when the input (or the weight) is channels_last.
    if _layout(x) == torch.channels_last or _layout(weight) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


@torch.library.register_fake("unetx::conv_bn_relu")
def _(x, x_scale, x_shift, x_pool, x2, x2_mode, weight, bias, transposed, stats, relu, x_mean=None):
    _check_4d(x, "unetx.conv_bn_relu", "x")
    _check_devices("unetx.conv_bn_relu", "x", x, weight=weight, bias=bias, x_scale=x_scale, x_shift=x_shift,
                   x_mean=x_mean, x2=x2)
    n, _, h, w = x.shape
    if x_pool:
        h, w = h // 2, w // 2
    k = weight.shape[-1]
    cout = weight.shape[1] if transposed else weight.shape[0]
    if transposed:
        h, w = h * k, w * k
    y = _empty((n, cout, h, w), x, _conv_out_format(x, weight))
    if stats:
        acc = _acc_dtype(x.dtype)
        return y, x.new_empty((cout,), dtype=acc), x.new_empty((cout,), dtype=acc)
    return y, x.new_empty((0,)), x.new_empty((0,))


@torch.library.register_fake("unetx::conv_bn_relu_backward")
def _(grad_y, grad_mean, grad_var, x, x_scale, x_shift, x_pool, x2, x2_mode, weight, has_bias, transposed, y, mean,
      relu, output_mask, x_mean=None):
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
        gw = _empty(weight.shape, weight, _layout(weight))
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
    _check_devices("unetx.conv_bn_relu", "x", x, weight=weight, bias=bias, x_scale=x_scale, x_shift=x_shift,
                   x_mean=x_mean, x2=x2)
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
    gw = gw.to(weight.dtype).contiguous(memory_format=_layout(weight)) if output_mask[2] else None
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
    _check_devices("unetx.bn_relu", "y", y, scale=scale, shift=shift, mean=mean)
    _warn_fallback(y.device)
    return ref.bn_relu(y, scale, shift, mean).to(y.dtype).contiguous(memory_format=_layout(y))


def _fb_bn_relu_backward(grad, y, scale, shift, mean=None):
    gx, gs, gt, gm = ref.bn_relu_backward(grad, y, scale, shift, mean)
    return gx.to(y.dtype).contiguous(memory_format=_layout(y)), gs.to(scale.dtype), gt.to(shift.dtype), gm


def _fb_bn_relu_pool(y, scale, shift, mean=None):
    _check_devices("unetx.bn_relu_pool", "y", y, scale=scale, shift=shift, mean=mean)
    _warn_fallback(y.device)
    fmt = _layout(y)
    z, p = ref.bn_relu_pool(y, scale, shift, mean)
    return z.to(y.dtype).contiguous(memory_format=fmt), p.to(y.dtype).contiguous(memory_format=fmt)


def _fb_bn_relu_pool_backward(grad_z, grad_p, y, scale, shift, mean=None):
    return _fb_bn_relu_backward(grad_z + ref._pool_backward(grad_p), y, scale, shift, mean)


def _fb_avg_pool2x2(x):
    _warn_fallback(x.device)
    return ref.avg_pool2x2(x).contiguous(memory_format=_layout(x))


def _fb_avg_pool2x2_backward(grad):
    return ref._pool_backward(grad).contiguous(memory_format=_layout(grad))


def _fb_upsample_concat(skip, x, mode):
    _check_devices("unetx.upsample_concat", "skip", skip, x=x)
    _warn_fallback(skip.device)
    return ref.upsample_concat(skip, x, mode).contiguous(memory_format=_layout(skip))


def _fb_upsample_concat_backward(grad, skip_channels, mode):
    fmt = _layout(grad)
    n, c, h, w = grad.shape
    f = 1 if mode == "none" else 2
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

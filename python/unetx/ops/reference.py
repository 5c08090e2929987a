"""Plain-PyTorch references of every unetx op (forward and closed-form backward).

This file is the single source of truth for what the fused ops compute. The tests compare the compiled
kernels against it, the benchmark uses it as the stock baseline, and on devices that have no unetx kernel the ops
fall back to these functions. The plain-PyTorch twin of the UNet is unetx.nn.reference.

Nothing here imports the compiled extension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

UPSAMPLE_MODES = ("none", "nearest", "bilinear")


# --------------------------------------------------------------------------------------------- ops
def _per_channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def bn_relu(y: Tensor, scale: Tensor, shift: Tensor, mean: Tensor | None = None) -> Tensor:
    """relu((y - mean[c]) * scale[c] + shift[c]): BatchNorm + ReLU with scale = gamma / sqrt(var + eps), shift = beta.

    mean None means 0 (scale and shift then carry the whole affine map).
    """
    if mean is not None:
        y = y - _per_channel(mean)
    return torch.relu(y * _per_channel(scale) + _per_channel(shift))


def avg_pool2x2(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 2)


def bn_relu_pool(y: Tensor, scale: Tensor, shift: Tensor, mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The encoder's epilogue: the skip activation and its 2x2 average pool."""
    z = bn_relu(y, scale, shift, mean)
    return z, avg_pool2x2(z)


def upsample2x(x: Tensor, mode: str) -> Tensor:
    if mode == "none":
        return x
    if mode == "nearest":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def upsample_concat(skip: Tensor, x: Tensor, mode: str = "nearest") -> Tensor:
    """cat([skip, upsample2x(x)], dim=1); mode "none" is the plain concatenation (transposed-conv path)."""
    return torch.cat([skip, upsample2x(x, mode)], dim=1)


def input_stage(
    x: Tensor,
    x_scale: Tensor | None,
    x_shift: Tensor | None,
    x_pool: bool,
    x2: Tensor | None,
    x2_mode: str,
    x_mean: Tensor | None = None,
) -> Tensor:
    """What a fused layer convolves: [pool](bn_relu(x)) concatenated with upsample(x2) on channels.

    x_scale/x_shift None means x is already an activation (an image, a pooled tensor, ...).
    """
    a = x if x_scale is None else bn_relu(x, x_scale, x_shift, x_mean)
    if x_pool:
        a = avg_pool2x2(a)
    if x2 is not None:
        a = torch.cat([a, upsample2x(x2, x2_mode)], dim=1)
    return a


def conv_bn_relu(
    x: Tensor,
    x_scale: Tensor | None,
    x_shift: Tensor | None,
    x_pool: bool,
    x2: Tensor | None,
    x2_mode: str,
    weight: Tensor,
    bias: Tensor | None,
    transposed: bool,
    stats: bool,
    relu: bool,
    x_mean: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused layer. Returns (y, mean, var).

    y = conv(input_stage(...)) ('same' padding, stride 1) or, with transposed, a stride-k transposed convolution;
    with relu, y is relu'd (eval: BatchNorm already folded into weight/bias).
    With stats, mean/var are y's biased batch statistics per channel (BatchNorm's training normalisation);
    otherwise they are empty. The caller turns them into scale/shift for the consumer of y.
    """
    a = input_stage(x, x_scale, x_shift, x_pool, x2, x2_mode, x_mean)
    if transposed:
        y = F.conv_transpose2d(a, weight, bias, stride=weight.shape[-1])
    else:
        y = F.conv2d(a, weight, bias, padding=weight.shape[-1] // 2)
    if relu:
        y = torch.relu(y)
    if stats:
        var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    else:
        mean = var = y.new_empty(0)
    return y, mean, var


def fold_batch_stats(mean: Tensor, var: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """BatchNorm's affine transform as one per-channel scale and shift (differentiable in all inputs).

    For the eval-mode fold into a convolution. Training keeps the mean separate (see `bn_relu`): folding it into
    the shift makes the gradient of scale a difference of two large sums when |mean| >> std.
    """
    scale = gamma * torch.rsqrt(var + eps)
    return scale, beta - mean * scale


# ------------------------------------------------------------------- backward (the fallback path)
def _pool_backward(g: Tensor) -> Tensor:
    return g.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) * 0.25


def _upsample_backward(g: Tensor, mode: str, input_size: list[int]) -> Tensor:
    if mode == "none":
        return g
    if mode == "nearest":
        return F.avg_pool2d(g, 2) * 4.0
    n, c = g.shape[:2]
    return torch.ops.aten.upsample_bilinear2d_backward(g, [g.shape[2], g.shape[3]], [n, c, *input_size], False)


def bn_relu_backward(grad: Tensor, y: Tensor, scale: Tensor, shift: Tensor, mean: Tensor | None = None):
    """Returns (grad_y, grad_scale, grad_shift, grad_mean); grad_mean is None when mean is None."""
    yc = y if mean is None else y - _per_channel(mean)
    pre = yc * _per_channel(scale) + _per_channel(shift)
    g = torch.where(pre <= 0, torch.zeros_like(grad), grad)  # NaN passes, as torch.relu's backward
    gt = g.sum((0, 2, 3))
    gm = None if mean is None else (-gt * scale).to(mean.dtype)
    return g * _per_channel(scale), (g * yc).sum((0, 2, 3)), gt, gm


def input_stage_backward(
    grad_a: Tensor,
    x: Tensor,
    x_scale: Tensor | None,
    x_shift: Tensor | None,
    x_pool: bool,
    x2: Tensor | None,
    x2_mode: str,
    x_mean: Tensor | None = None,
):
    """Returns (grad_x, grad_scale, grad_shift, grad_x2, grad_mean)."""
    c1 = x.shape[1]
    g1 = grad_a[:, :c1]
    if x_pool:
        g1 = _pool_backward(g1)
    gx2 = None
    if x2 is not None:
        gx2 = _upsample_backward(grad_a[:, c1:], x2_mode, [x2.shape[2], x2.shape[3]])
    if x_scale is None:
        return g1, None, None, gx2, None
    gx, gs, gt, gm = bn_relu_backward(g1, x, x_scale, x_shift, x_mean)
    return gx, gs, gt, gx2, gm


def conv_bn_relu_backward(
    grad_y: Tensor,
    grad_mean: Tensor | None,
    grad_var: Tensor | None,
    x: Tensor,
    x_scale: Tensor | None,
    x_shift: Tensor | None,
    x_pool: bool,
    x2: Tensor | None,
    x2_mode: str,
    weight: Tensor,
    has_bias: bool,
    transposed: bool,
    y: Tensor,
    mean: Tensor,
    relu: bool,
    x_mean: Tensor | None = None,
):
    """Closed-form backward of `conv_bn_relu` in stock ops. Returns (gx, gscale, gshift, gx2, gweight, gbias, gmean)."""
    g = grad_y
    if relu:
        g = torch.where(y <= 0, torch.zeros_like(g), g)
    if grad_mean is not None or grad_var is not None:
        n = y.numel() // y.shape[1]
        g = g.clone()
        if grad_mean is not None:
            g = g + _per_channel(grad_mean) / n
        if grad_var is not None:
            g = g + _per_channel(grad_var) * 2.0 / n * (y - _per_channel(mean))
    a = input_stage(x, x_scale, x_shift, x_pool, x2, x2_mode, x_mean)
    k = weight.shape[-1]
    stride, pad = ([k, k], [0, 0]) if transposed else ([1, 1], [k // 2, k // 2])
    bias_sizes = [weight.shape[1] if transposed else weight.shape[0]] if has_bias else None
    ga, gw, gb = torch.ops.aten.convolution_backward(
        g, a, weight, bias_sizes, stride, pad, [1, 1], transposed, [0, 0], 1, [True, True, has_bias]
    )
    gx, gs, gt, gx2, gm = input_stage_backward(ga, x, x_scale, x_shift, x_pool, x2, x2_mode, x_mean)
    return gx, gs, gt, gx2, gw, gb, gm


def winograd_conv3x3(x: Tensor, weight: Tensor, tile: int = 4) -> Tensor:
    """What unetx.winograd_conv3x3 computes, whatever the tile: a 3x3 'same' convolution."""
    return F.conv2d(x, weight, padding=1)

"""Plain-PyTorch references: every unetx op, and the reference UNet.

This file is the single source of truth for what the fused ops compute. The tests compare the compiled
kernels against it, the benchmark uses it as the stock baseline, `UNet.to_reference()` exports to it, and on
devices that have no unetx kernel the ops fall back to these functions.

Nothing here imports the compiled extension.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


# ----------------------------------------------------------------------------------- the network
class ConvBNReLU(nn.Module):
    """Conv2d (k x k, 'same', stride 1) -> BatchNorm2d -> ReLU, in stock modules."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class DoubleConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.block1 = ConvBNReLU(in_channels, out_channels)
        self.block2 = ConvBNReLU(out_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block2(self.block1(x))


def make_up(in_channels: int, out_channels: int, upsample: str) -> nn.Module:
    """The decoder's upsampling step: a 2x2 stride-2 transposed conv, or upsample then a 1x1 conv.

    With a 1x1 conv, upsample-then-conv equals conv-then-upsample exactly (both are per-pixel linear and
    the interpolation weights sum to one), which is what lets the fused model convolve at the low resolution.
    """
    if upsample == "transpose":
        return nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
    align = {"align_corners": False} if upsample == "bilinear" else {}
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=upsample, **align), nn.Conv2d(in_channels, out_channels, 1))


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, upsample: str):
        super().__init__()
        self.up = make_up(in_channels, out_channels, upsample)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


def check_config(in_channels, out_channels, base_channels, depth, pool, upsample, dropout) -> None:
    """Constructor arguments, checked once for both UNets so the messages are the same."""
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("base_channels", base_channels)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"UNet: {name} must be a positive int, got {v!r}")
    if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= 8:
        raise ValueError(f"UNet: depth (number of poolings) must be an int in 1..8, got {depth!r}")
    if pool not in ("avg", "max"):
        raise ValueError(f"UNet: pool must be 'avg' or 'max', got {pool!r}")
    if upsample not in ("transpose", "nearest", "bilinear"):
        raise ValueError(f"UNet: upsample must be 'transpose', 'nearest' or 'bilinear', got {upsample!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"UNet: dropout must be a probability in [0, 1), got {dropout!r}")


def check_input(x: Tensor, in_channels: int, who: str = "UNet") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{who}: expected a 4-D input (batch, channels, height, width), got shape {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0)"
        )
    if not x.is_floating_point():
        raise TypeError(f"{who}: expected a floating-point input, got {x.dtype}; convert with x.float()")
    if x.shape[1] != in_channels:
        raise ValueError(f"{who}: expected {in_channels} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})")


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, int, int]:
    """Pad bottom/right to the next multiple (mirror padding; replicate where the image is too small to mirror).

    Returns the padded tensor and the original height and width to crop back to.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, h, w
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), h, w


class UNet(nn.Module):
    """The reference U-Net in stock torch.nn modules; `unetx.UNet` has the same constructor and state_dict.

    depth poolings; level i has base_channels * 2**i channels; each level two 3x3 Conv-BN-ReLU; skips are
    concatenated on channels ([skip, upsampled]); a 1x1 head gives logits. Inputs of any height and width are
    mirror-padded (bottom/right) to a multiple of 2**depth and the logits cropped back.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        base_channels: int = 64,
        depth: int = 4,
        pool: str = "avg",
        upsample: str = "transpose",
        dropout: float = 0.0,
    ):
        super().__init__()
        check_config(in_channels, out_channels, base_channels, depth, pool, upsample, dropout)
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, base_channels=base_channels, depth=depth,
            pool=pool, upsample=upsample, dropout=float(dropout),
        )
        ch = [base_channels * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList(DoubleConv(in_channels if i == 0 else ch[i - 1], ch[i]) for i in range(depth))
        self.pool = nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(ch[depth - 1], ch[depth])
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.ModuleList(UpBlock(ch[i + 1], ch[i], upsample) for i in reversed(range(depth)))
        self.head = nn.Conv2d(ch[0], out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.config["in_channels"], "reference.UNet")
        x, h, w = pad_to_multiple(x, 2 ** self.config["depth"])
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.bottleneck(x))
        for up, skip in zip(self.decoder, reversed(skips)):
            x = up(x, skip)
        return self.head(x)[..., :h, :w]


def receptive_margin(depth: int) -> int:
    """Pixels of context on each side that influence an output pixel (3x3 convs, 2x pooling; an upper bound)."""
    margin = 0
    for level in range(depth):
        margin += 2 * 2**level  # two 3x3 convs on the way down
        margin += 2 * 2**level  # two on the way up
        margin += 2**level  # pooling / upsampling alignment
    margin += 2 * 2**depth
    return int(math.ceil(margin))

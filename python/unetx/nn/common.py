"""What both UNets (unetx.UNet and its plain-PyTorch twin unetx.nn.reference.UNet) share, so their checks, messages,
padding and decoder modules are the same by construction: constructor and input checks, the bottom/right padding
to a multiple of 2**depth, the decoder's upsampling module, and the receptive margin tiled prediction needs.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


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
        raise ValueError(
            f"{who}: expected {in_channels} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
        )


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


def make_up(in_channels: int, out_channels: int, upsample: str) -> nn.Module:
    """The decoder's upsampling step: a 2x2 stride-2 transposed conv, or upsample then a 1x1 conv.

    With a 1x1 conv, upsample-then-conv equals conv-then-upsample exactly (both are per-pixel linear and
    the interpolation weights sum to one), which is what lets the fused model convolve at the low resolution.
    """
    if upsample == "transpose":
        return nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
    align = {"align_corners": False} if upsample == "bilinear" else {}
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=upsample, **align), nn.Conv2d(in_channels, out_channels, 1))


def receptive_margin(depth: int) -> int:
    """Pixels of context on each side that influence an output pixel (3x3 convs, 2x pooling; an upper bound)."""
    margin = 0
    for level in range(depth):
        margin += 2 * 2**level  # two 3x3 convs on the way down
        margin += 2 * 2**level  # two on the way up
        margin += 2**level  # pooling / upsampling alignment
    margin += 2 * 2**depth
    return int(math.ceil(margin))

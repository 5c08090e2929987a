"""The plain-PyTorch twin of unetx.UNet, in stock torch.nn modules: same constructor, module tree and state_dict.

`UNet.to_reference()` exports to it (for torch.export, ONNX, or a machine without the extension); the tests hold the
fused UNet to it. Nothing here imports the compiled extension.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import check_config, check_input, make_up, pad_to_multiple

__all__ = ["ConvBNReLU", "DoubleConv", "UNet", "UpBlock"]


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


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, upsample: str):
        super().__init__()
        self.up = make_up(in_channels, out_channels, upsample)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


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
            in_channels=in_channels,
            out_channels=out_channels,
            base_channels=base_channels,
            depth=depth,
            pool=pool,
            upsample=upsample,
            dropout=float(dropout),
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

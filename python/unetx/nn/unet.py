"""unetx.UNet: the U-Net on the fused ops. Same constructor, module tree and state_dict as its plain-PyTorch twin
`unetx.nn.reference.UNet` (also `unetx.reference.UNet`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from . import reference
from .common import check_config, check_input, make_up, pad_to_multiple
from .layers import Act, DoubleConv


class UpBlock(nn.Module):
    """Decoder level: `up` (ConvTranspose2d, or Upsample + 1x1 Conv2d) then a DoubleConv on [skip, up(x)]."""

    def __init__(self, in_channels: int, out_channels: int, upsample: str, sync_bn: bool = False):
        super().__init__()
        self.up = make_up(in_channels, out_channels, upsample)
        self.conv = DoubleConv(2 * out_channels, out_channels, sync_bn=sync_bn)
        self.mode = upsample

    def pending(self, x: Act, skip: Act) -> Act:
        if self.mode == "transpose":
            conv, x2_mode = self.up, "none"
        else:
            # a 1x1 conv commutes with the upsampling: convolve at the low resolution, upsample inside the
            # next layer's input stage (the fused upsample_concat), never materialising the upsampled tensor.
            conv, x2_mode = self.up[1], self.mode
        u, _, _ = ops.conv_bn_relu(
            x.y,
            conv.weight,
            conv.bias,
            x_scale=x.scale,
            x_shift=x.shift,
            x_mean=x.mean,
            transposed=self.mode == "transpose",
            stats=False,
        )
        return self.conv.pending(skip, x2=u, x2_mode=x2_mode)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.pending(Act(x), Act(skip)).materialize()


class UNet(nn.Module):
    """A U-Net whose conv-BN-ReLU, pooling and skip concatenation run on unetx's fused kernels.

    Arguments read like the paper: `depth` poolings; level i has `base_channels * 2**i` channels and two 3x3
    conv-BN-ReLU; `pool` "avg" (default, the seed's choice) or "max"; `upsample` "transpose" (2x2 stride-2
    ConvTranspose2d), "nearest" or "bilinear" (upsample then 1x1 conv); `dropout` at the end of the contracting
    path; skips concatenated on channels; a 1x1 head gives `out_channels` logits. `sync_bn=True` computes batch
    statistics across all processes of the default process group (as nn.SyncBatchNorm).

    Any height and width: the input is mirror-padded (bottom/right) to the next multiple of 2**depth and the
    logits are cropped back to the input size.

    The state_dict is identical to `unetx.nn.reference.UNet(...)`'s: weights load both ways
    (`to_reference()`, `UNet.from_reference(m)`).
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
        sync_bn: bool = False,
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
        self.sync_bn = sync_bn
        ch = [base_channels * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList(
            DoubleConv(in_channels if i == 0 else ch[i - 1], ch[i], sync_bn=sync_bn) for i in range(depth)
        )
        self.pool = nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(ch[depth - 1], ch[depth], sync_bn=sync_bn)
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.ModuleList(
            UpBlock(ch[i + 1], ch[i], upsample, sync_bn=sync_bn) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(ch[0], out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.config["in_channels"], "unetx.UNet")
        out_format = ops.memory_format(x)
        x, h, w = pad_to_multiple(x, 2 ** self.config["depth"])
        if x.device.type == "cpu" and ops.memory_format(x) != torch.channels_last:
            # On the CPU the network runs channels-last whatever the input's layout: oneDNN's forward and input
            # gradient are faster there, and the weight gradient is unetx's own channels-last kernel
            # (csrc/cpu/conv_weight_grad.cpp). empty_like gives channels-last strides even to a 1-channel image.
            x = torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
        # under torch.autocast each op casts its data to the autocast dtype itself (unetx.ops.autocast)
        a = Act(x)
        avg = self.config["pool"] == "avg"
        skips: list[Act] = []
        for i, block in enumerate(list(self.encoder) + [self.bottleneck]):
            if i == 0:
                a = block.pending(a)
            elif avg:
                a = block.pending(a, pool=True)  # the pooling happens in this layer's input stage
            else:
                a = block.pending(Act(F.max_pool2d(a.materialize(), 2)))
            if i < len(self.encoder):
                skips.append(a)
        if self.training and self.dropout.p > 0:
            a = Act(self.dropout(a.materialize()))
        for up, skip in zip(self.decoder, reversed(skips)):
            a = up.pending(a, skip)
        logits, _, _ = ops.conv_bn_relu(
            a.y, self.head.weight, self.head.bias, x_scale=a.scale, x_shift=a.shift, x_mean=a.mean, stats=False
        )
        return logits[..., :h, :w].contiguous(memory_format=out_format)

    # ----------------------------------------------------------------------------- plain-PyTorch twin
    def to_reference(self) -> reference.UNet:
        """The same network in stock torch.nn modules with these weights (for export, or to compare)."""
        m = reference.UNet(**self.config)
        m.load_state_dict(self.state_dict())
        return m.to(next(self.parameters()).device).train(self.training)

    @classmethod
    def from_reference(cls, m: nn.Module, sync_bn: bool = False) -> UNet:
        cfg = getattr(m, "config", None)
        if not isinstance(cfg, dict):
            raise TypeError(
                f"UNet.from_reference: expected a unetx.reference.UNet (with .config), got {type(m).__name__}"
            )
        u = cls(**cfg, sync_bn=sync_bn)
        u.load_state_dict(m.state_dict())
        return u.to(next(m.parameters()).device).train(m.training)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        _check_state_dict(self, state_dict, strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _check_state_dict(model: nn.Module, state_dict, strict: bool) -> None:
    """A state_dict from another configuration gets one message naming the first mismatch and the config."""
    own = model.state_dict()
    for k, v in state_dict.items():
        if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"UNet.load_state_dict: '{k}' has shape {tuple(v.shape)} in the state_dict but "
                f"{tuple(own[k].shape)} in "
                f"this model ({model.config}); the weights come from a UNet with a different configuration"
            )
    if strict:
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing or unexpected:
            raise ValueError(
                f"UNet.load_state_dict: the state_dict does not fit this model ({model.config}): "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; "
                "build the UNet with the configuration the weights were trained with"
            )

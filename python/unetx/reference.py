"""`unetx.reference`: every plain-PyTorch reference in one namespace, as the tests and users have long spelled it -
the op references (unetx.ops.reference) and the UNet's plain-PyTorch twin (unetx.nn.reference). Production code
imports neither through here."""

from __future__ import annotations

from .nn.common import receptive_margin
from .nn.reference import ConvBNReLU, DoubleConv, UNet, UpBlock
from .ops.reference import (
    UPSAMPLE_MODES,
    _pool_backward,
    _upsample_backward,
    avg_pool2x2,
    bn_relu,
    bn_relu_backward,
    bn_relu_pool,
    conv_bn_relu,
    conv_bn_relu_backward,
    fold_batch_stats,
    input_stage,
    input_stage_backward,
    upsample2x,
    upsample_concat,
)

__all__ = [
    "UPSAMPLE_MODES",
    "ConvBNReLU",
    "DoubleConv",
    "UNet",
    "UpBlock",
    "_pool_backward",
    "_upsample_backward",
    "avg_pool2x2",
    "bn_relu",
    "bn_relu_backward",
    "bn_relu_pool",
    "conv_bn_relu",
    "conv_bn_relu_backward",
    "fold_batch_stats",
    "input_stage",
    "input_stage_backward",
    "receptive_margin",
    "upsample2x",
    "upsample_concat",
]

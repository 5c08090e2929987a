"""The neural-network modules on the unetx ops: the fused layers, the UNet, its plain-PyTorch twin, and convert() for
U-Nets written in stock modules. Imports torch and unetx.ops only; never the application.

  layers.py     Act (a pending BatchNorm + ReLU), ConvBNReLU, DoubleConv: state_dict-compatible with torch.nn
  unet.py       UNet: the U-Net on the fused ops
  reference.py  the same UNet in stock torch.nn modules (export, comparison)
  common.py     what both UNets share: constructor/input checks, padding, the decoder's up module, receptive margin
  convert.py    convert(model): a stock U-Net's Conv-BN-ReLU chains onto the fused ops
"""

from __future__ import annotations

from . import reference
from .convert import convert
from .layers import Act, ConvBNReLU, DoubleConv
from .unet import UNet

__all__ = ["Act", "ConvBNReLU", "DoubleConv", "UNet", "convert", "reference"]

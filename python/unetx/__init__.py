"""unetx: a U-Net for image segmentation whose conv-BN-ReLU, pooling and skip concatenation run on fused kernels.

    import unetx
    model = unetx.UNet(in_channels=1, out_channels=2)      # drop-in nn.Module, state_dict-compatible with
    ref = unetx.reference.UNet(in_channels=1, out_channels=2)   # ... this plain-PyTorch twin
"""

from __future__ import annotations

import torch  # noqa: F401  (load libtorch before the extension)

from . import ops
from .ops import build_info
from . import nn
from .nn import ConvBNReLU, DoubleConv, UNet, convert
from . import reference
from . import checkpoint, data, losses, metrics, predict, synthetic
from .data import ClassTable, InputError
from .predict import predict_tiled
from .train import TrainConfig

__version__ = "0.1.0"

__all__ = ["UNet", "convert", "predict_tiled", "TrainConfig", "ClassTable", "InputError", "checkpoint", "data", "losses",
           "metrics", "predict", "synthetic", "ConvBNReLU", "DoubleConv", "ops", "reference", "build_info", "__version__"]

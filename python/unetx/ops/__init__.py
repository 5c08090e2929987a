"""The unetx op library: the compiled kernels as torch.ops.unetx.*, with one module per op holding its Python wrapper,
fake (meta) impl, autograd formula (each backward is itself a registered op) and stock-PyTorch fallback.

  conv_bn_relu      the fused layer: input stage (normalise + ReLU of the previous layer, pool, concat an
                    upsampled second input) -> convolution -> batch statistics          (ops/conv_bn_relu.py)
  bn_relu           relu((y - mean) * scale + shift)                                    (ops/bn_relu.py)
  bn_relu_pool      (bn_relu(y), its 2x2 average pool) in one pass                      (ops/bn_relu.py)
  avg_pool2x2       2x2 average pooling, stride 2                                       (ops/avg_pool2x2.py)
  upsample_concat   cat([skip, upsample2x(x)], dim=1) in one pass                       (ops/upsample_concat.py)
  winograd_conv3x3  3x3 'same' convolution by Winograd F(4x4) / F(2x2), CPU float32      (ops/winograd_conv3x3.py)
                    (hold_weight_transforms / release_weight_transforms: its transformed weight kept
                    across calls, for eval weights)

Kernels: csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu, schemas in csrc/registration.cpp. Plain-PyTorch references:
unetx.ops.reference. Autocast: unetx.ops.autocast (one rule for all ops). Devices: unetx.ops._dispatch.
The extension loader: unetx.ops._extension. The convolution passes' measured choices, kept per machine across
processes: unetx.ops.algo_choice (loaded here, saved at exit).
This package imports torch and the extension only (and reads and writes the choice cache's one file).
"""

from __future__ import annotations

from . import algo_choice, autocast, reference
from ._common import memory_format
from ._dispatch import FALLBACKS, build_info, cuda_kernels_enabled
from .avg_pool2x2 import avg_pool2x2
from .bn_relu import bn_relu, bn_relu_pool
from .conv_bn_relu import conv_bn_relu
from .upsample_concat import upsample_concat
from .winograd_conv3x3 import (
    held_weight_transforms,
    hold_weight_transforms,
    release_weight_transforms,
    winograd_conv3x3,
)

algo_choice.install()

__all__ = [
    "FALLBACKS",
    "algo_choice",
    "autocast",
    "avg_pool2x2",
    "bn_relu",
    "bn_relu_pool",
    "build_info",
    "conv_bn_relu",
    "cuda_kernels_enabled",
    "held_weight_transforms",
    "hold_weight_transforms",
    "memory_format",
    "reference",
    "release_weight_transforms",
    "upsample_concat",
    "winograd_conv3x3",
]

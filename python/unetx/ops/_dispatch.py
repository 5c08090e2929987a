"""Which device runs what: the CUDA kernels (opt-in with UNETX_CUDA_KERNELS=1 until verified on a GPU) and, on
every device with no unetx kernel (CUDA without the opt-in, MPS, XPU), each op's stock-PyTorch fallback."""

from __future__ import annotations

import os

import torch

from . import avg_pool2x2, bn_relu, conv_bn_relu, upsample_concat
from ._extension import _C, BUILD_INFO

FALLBACKS = {**conv_bn_relu.FALLBACKS, **bn_relu.FALLBACKS, **avg_pool2x2.FALLBACKS, **upsample_concat.FALLBACKS}

_cuda_kernels = False
if BUILD_INFO["cuda"] and os.environ.get("UNETX_CUDA_KERNELS", "0") == "1":
    _cuda_kernels = bool(_C.register_cuda_kernels())

_fallback_lib = torch.library.Library("unetx", "IMPL")
for _key in ("MPS", "XPU") if _cuda_kernels else ("CUDA", "MPS", "XPU"):
    for _name, _fn in FALLBACKS.items():
        _fallback_lib.impl(_name, _fn, _key)


def cuda_kernels_enabled() -> bool:
    """True when the compiled CUDA kernels serve CUDA tensors (opt-in with UNETX_CUDA_KERNELS=1 until verified)."""
    return _cuda_kernels


def build_info() -> dict:
    """How the extension was built: torch version, compiler, whether CUDA kernels were compiled and for which archs."""
    info = dict(BUILD_INFO)
    info["cuda_kernels_enabled"] = cuda_kernels_enabled()
    return info

"""unetx.avg_pool2x2: 2x2 average pooling, stride 2 (even height and width).

Kernels: csrc/cpu/avg_pool2x2.cpp, csrc/cuda/avg_pool2x2.cu; reference: unetx.ops.reference.avg_pool2x2;
tests: tests/test_avg_pool2x2.py; bench: bench/bench_ops.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference as ref
from ._common import _check_4d, _check_even, _empty, _layout, _ops, _pooled, _warn_fallback


def avg_pool2x2(x: Tensor) -> Tensor:
    """2x2 average pooling with stride 2, as F.avg_pool2d(x, 2) on a 4-D x of even height and width."""
    return _ops.avg_pool2x2(x)


@torch.library.register_fake("unetx::avg_pool2x2")
def _(x):
    _check_4d(x, "unetx.avg_pool2x2", "x")
    _check_even(x, "unetx.avg_pool2x2")
    return _empty(_pooled(x), x, _layout(x))


@torch.library.register_fake("unetx::avg_pool2x2_backward")
def _(grad):
    _check_4d(grad, "unetx.avg_pool2x2_backward", "grad")
    n, c, h, w = grad.shape
    return _empty((n, c, 2 * h, 2 * w), grad, _layout(grad))


def _avg_pool_backward(ctx, grad):
    return _ops.avg_pool2x2_backward(grad)


torch.library.register_autograd(
    "unetx::avg_pool2x2", _avg_pool_backward, setup_context=lambda ctx, inputs, output: None
)


def _fb_avg_pool2x2(x):
    _check_4d(x, "unetx.avg_pool2x2", "x")
    _check_even(x, "unetx.avg_pool2x2")
    _warn_fallback(x.device)
    return ref.avg_pool2x2(x).contiguous(memory_format=_layout(x))


def _fb_avg_pool2x2_backward(grad):
    _check_4d(grad, "unetx.avg_pool2x2_backward", "grad")
    return ref._pool_backward(grad).contiguous(memory_format=_layout(grad))


FALLBACKS = {"avg_pool2x2": _fb_avg_pool2x2, "avg_pool2x2_backward": _fb_avg_pool2x2_backward}

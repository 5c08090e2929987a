"""unetx.upsample_concat: cat([skip, upsample2x(x)], dim=1) in one pass (a U-Net decoder's skip connection).

Kernels: csrc/cpu/upsample_concat.cpp, csrc/cuda/upsample_concat.cu; reference: unetx.ops.reference.upsample_concat;
tests: tests/test_upsample_concat.py; bench: bench/bench_ops.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference as ref
from ._common import _check_4d, _check_mode, _check_same, _empty, _layout, _ops, _shape, _warn_fallback


def upsample_concat(skip: Tensor, x: Tensor, mode: str = "nearest") -> Tensor:
    """cat([skip, upsample2x(x)], dim=1) without materialising the upsampled x.

    mode "nearest" or "bilinear" (align_corners=False) upsamples 2x; "none" is the plain concatenation (skip and x
    of the same height and width)."""
    return _ops.upsample_concat(skip, x, mode)


def _args_upsample_concat(skip: Tensor, x: Tensor, mode: str) -> None:
    op = "unetx.upsample_concat"
    f = _check_mode(mode, op)
    _check_4d(skip, op, "skip")
    _check_4d(x, op, "x")
    _check_same(op, "skip", skip, "x", x)
    torch._check(
        skip.shape[0] == x.shape[0] and skip.shape[2] == f * x.shape[2] and skip.shape[3] == f * x.shape[3],
        lambda: (
            f"{op}: skip {_shape(skip)} does not match x {_shape(x)} upsampled {f}x (expected skip of "
            f"shape [{x.shape[0]}, *, {f * x.shape[2]}, {f * x.shape[3]}])"
        ),
    )


def _args_upsample_concat_backward(grad: Tensor, skip_channels: int, mode: str) -> int:
    op = "unetx.upsample_concat_backward"
    f = _check_mode(mode, op)
    _check_4d(grad, op, "grad")
    torch._check(
        0 <= skip_channels <= grad.shape[1],
        lambda: f"{op}: skip_channels={skip_channels} out of range for grad {_shape(grad)}",
    )
    torch._check(
        grad.shape[2] % f == 0 and grad.shape[3] % f == 0,
        lambda: f"{op}: grad {_shape(grad)} must have an even height and width for 2x upsampling",
    )
    return f


@torch.library.register_fake("unetx::upsample_concat")
def _(skip, x, mode):
    _args_upsample_concat(skip, x, mode)
    n, cs, h, w = skip.shape
    return _empty((n, cs + x.shape[1], h, w), skip, _layout(skip))


@torch.library.register_fake("unetx::upsample_concat_backward")
def _(grad, skip_channels, mode):
    f = _args_upsample_concat_backward(grad, skip_channels, mode)
    n, c, h, w = grad.shape
    fmt = _layout(grad)
    return _empty((n, skip_channels, h, w), grad, fmt), _empty((n, c - skip_channels, h // f, w // f), grad, fmt)


def _upsample_concat_setup(ctx, inputs, output):
    skip, _, mode = inputs
    ctx.skip_channels, ctx.mode = skip.shape[1], mode


def _upsample_concat_backward(ctx, grad):
    gs, gx = _ops.upsample_concat_backward(grad, ctx.skip_channels, ctx.mode)
    return gs, gx, None


torch.library.register_autograd(
    "unetx::upsample_concat", _upsample_concat_backward, setup_context=_upsample_concat_setup
)


def _fb_upsample_concat(skip, x, mode):
    _args_upsample_concat(skip, x, mode)
    _warn_fallback(skip.device)
    return ref.upsample_concat(skip, x, mode).contiguous(memory_format=_layout(skip))


def _fb_upsample_concat_backward(grad, skip_channels, mode):
    f = _args_upsample_concat_backward(grad, skip_channels, mode)
    fmt = _layout(grad)
    n, c, h, w = grad.shape
    gx = ref._upsample_backward(grad[:, skip_channels:], mode, [h // f, w // f])
    # clone: with batch 1 a channel slice of grad is already dense, and outputs may not alias inputs
    gx = gx.clone(memory_format=fmt) if mode == "none" else gx.contiguous(memory_format=fmt)
    return grad[:, :skip_channels].clone(memory_format=fmt), gx


FALLBACKS = {"upsample_concat": _fb_upsample_concat, "upsample_concat_backward": _fb_upsample_concat_backward}

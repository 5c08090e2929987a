"""unetx.winograd_conv3x3: a 3x3, stride-1, 'same' convolution by Winograd F(4x4,3x3) (tile=4) or F(2x2,3x3)
(tile=2), with its input and weight gradients; CPU, float32 or bfloat16 (inputs and results in that dtype,
transforms and tile products in float32). conv_bn_relu uses these kernels where they measure
faster than oneDNN for a layer's shape (csrc/cpu/algo_choice.h); this wrapper is for direct use and tests.

Kernels: csrc/cpu/winograd.cpp (CPU only); reference: unetx.ops.reference.winograd_conv3x3 (F.conv2d);
tests: tests/test_winograd.py; bench: bench/winograd.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import _check_4d, _ops
from ._extension import _C


def winograd_conv3x3(x: Tensor, weight: Tensor, tile: int = 4) -> Tensor:
    """F.conv2d(x, weight, padding=1) for a float32 or bfloat16 CPU x [N, C, H, W] and weight [Co, C, 3, 3] (one
    dtype), by Winograd's minimal filtering: 4x (tile=4) or 2.25x (tile=2) fewer multiplications, a larger rounding
    error in float32 (within 64x resp. 4x stock float32's; in bfloat16 within 2x stock bfloat16's, the result's
    rounding dominating; tests/test_winograd.py). The output is channels-last. Differentiable in x and weight."""
    return _ops.winograd_conv3x3(x, weight, tile)


def hold_weight_transforms(weight: Tensor) -> None:
    """Keep the CPU Winograd forward's transformed weight of `weight` (computed by its first forward; float32, 36 / 9
    times its values for tile 4) across calls instead of transforming it on every call, until `weight` is released
    (release_weight_transforms) or freed (its transforms are then dropped at the next Winograd forward). A change in
    place or through `.data =` is seen (transformed again). Of the tiles a layer measures, those it ever chose stay
    held. unetx.nn's eval layers hold their folded weights this way. A no-op for a tensor off the CPU; an inference
    tensor (no version counter) is refused."""
    _check_tensor("unetx.hold_weight_transforms", weight)
    if weight.device.type == "cpu":
        _C.hold_weight_transforms(weight)


def release_weight_transforms(weight: Tensor) -> None:
    """Stop holding `weight`'s transforms (hold_weight_transforms) and free them now."""
    _check_tensor("unetx.release_weight_transforms", weight)
    if weight.device.type == "cpu":
        _C.release_weight_transforms(weight)


def _check_tensor(op: str, weight) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{op}: expected the weight as a torch.Tensor, got {type(weight).__name__}")


def held_weight_transforms() -> tuple[int, int]:
    """(weights held by hold_weight_transforms and still alive, bytes their transformed weights take)."""
    return tuple(_C.held_weight_transforms())


def _fake_conv(op, t, name, weight, out_channels):
    """The forward's and the input gradient's output: t's batch and size, out_channels, channels-last."""
    _check_4d(t, op, name)
    _check_4d(weight, op, "weight")
    torch._check(tuple(weight.shape[2:]) == (3, 3), lambda: f"{op}: expected a 3x3 weight, got {tuple(weight.shape)}")
    n, _, h, w = t.shape
    return t.new_empty((n, out_channels, h, w)).contiguous(memory_format=torch.channels_last)


@torch.library.register_fake("unetx::winograd_conv3x3")
def _(x, weight, tile=4):
    return _fake_conv("unetx.winograd_conv3x3", x, "x", weight, weight.shape[0])


@torch.library.register_fake("unetx::winograd_conv3x3_input_grad")
def _(grad_y, weight, tile=4):
    return _fake_conv("unetx.winograd_conv3x3_input_grad", grad_y, "grad_y", weight, weight.shape[1])


@torch.library.register_fake("unetx::winograd_conv3x3_weight_grad")
def _(grad_y, x, tile=4):
    op = "unetx.winograd_conv3x3_weight_grad"
    _check_4d(grad_y, op, "grad_y")
    _check_4d(x, op, "x")
    return x.new_empty((grad_y.shape[1], x.shape[1], 3, 3))


def _setup(ctx, inputs, output):
    x, weight, tile = inputs
    ctx.save_for_backward(x, weight)
    ctx.tile = tile


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    gx = _ops.winograd_conv3x3_input_grad(grad, weight, ctx.tile) if ctx.needs_input_grad[0] else None
    gw = _ops.winograd_conv3x3_weight_grad(grad, x, ctx.tile) if ctx.needs_input_grad[1] else None
    return gx, gw, None


torch.library.register_autograd("unetx::winograd_conv3x3", _backward, setup_context=_setup)

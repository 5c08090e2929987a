"""unetx.bn_relu and unetx.bn_relu_pool: a pending BatchNorm + ReLU applied, alone or with its 2x2 average pool.

Kernels: csrc/cpu/bn_relu.cpp, csrc/cuda/bn_relu.cu; reference: unetx.ops.reference.bn_relu, bn_relu_pool;
tests: tests/test_bn_relu.py; bench: bench/bench_ops.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference as ref
from ._common import (
    _check_4d,
    _check_devices,
    _check_even,
    _check_grad,
    _check_vector,
    _empty,
    _layout,
    _ops,
    _pooled,
    _warn_fallback,
)


def bn_relu(y: Tensor, scale: Tensor, shift: Tensor, mean: Tensor | None = None) -> Tensor:
    """relu((y - mean) * scale + shift) per channel (mean None = 0)."""
    return _ops.bn_relu(y, scale, shift, mean)


def bn_relu_pool(y: Tensor, scale: Tensor, shift: Tensor, mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(z, avg_pool2x2(z)) with z = bn_relu(y, scale, shift, mean), in one pass: a U-Net encoder level's skip
    activation and the next level's input. y needs an even height and width."""
    return _ops.bn_relu_pool(y, scale, shift, mean)


def _args_bn_relu(op: str, y: Tensor, scale: Tensor, shift: Tensor, mean: Tensor | None, pool: bool) -> None:
    _check_4d(y, op, "y")
    _check_devices(op, "y", y, scale=scale, shift=shift, mean=mean)
    for name, v in (("scale", scale), ("shift", shift), ("mean", mean)):
        if v is not None:
            _check_vector(op, name, v, y.shape[1], y)
    if pool:
        _check_even(y, op)


# ----------------------------------------------------------------------------------- fake (meta) impls
@torch.library.register_fake("unetx::bn_relu")
def _(y, scale, shift, mean=None):
    _args_bn_relu("unetx.bn_relu", y, scale, shift, mean, pool=False)
    return _empty(y.shape, y, _layout(y))


def _activation_grads_fake(y, scale, shift, mean):
    gm = None if mean is None else torch.empty_like(mean)
    return _empty(y.shape, y, _layout(y)), torch.empty_like(scale), torch.empty_like(shift), gm


@torch.library.register_fake("unetx::bn_relu_backward")
def _(grad, y, scale, shift, mean=None):
    op = "unetx.bn_relu_backward"
    _args_bn_relu(op, y, scale, shift, mean, pool=False)
    _check_grad(op, "grad", grad, "y", y, y.shape)
    return _activation_grads_fake(y, scale, shift, mean)


@torch.library.register_fake("unetx::bn_relu_pool")
def _(y, scale, shift, mean=None):
    _args_bn_relu("unetx.bn_relu_pool", y, scale, shift, mean, pool=True)
    fmt = _layout(y)
    return _empty(y.shape, y, fmt), _empty(_pooled(y), y, fmt)


@torch.library.register_fake("unetx::bn_relu_pool_backward")
def _(grad_z, grad_p, y, scale, shift, mean=None):
    op = "unetx.bn_relu_pool_backward"
    _args_bn_relu(op, y, scale, shift, mean, pool=True)
    _check_grad(op, "grad_z", grad_z, "y", y, y.shape)
    _check_grad(op, "grad_p", grad_p, "y", y, _pooled(y))
    return _activation_grads_fake(y, scale, shift, mean)


# -------------------------------------------------------------------------------------------- autograd
def _bn_relu_setup(ctx, inputs, output):
    y, scale, shift, *mean = inputs  # a trailing mean=None may be left out of inputs
    ctx.save_for_backward(y, scale, shift, mean[0] if mean else None)
    ctx.n_inputs = len(inputs)


def _bn_relu_backward(ctx, grad):
    y, scale, shift, mean = ctx.saved_tensors
    return _ops.bn_relu_backward(grad, y, scale, shift, mean)[: ctx.n_inputs]


torch.library.register_autograd("unetx::bn_relu", _bn_relu_backward, setup_context=_bn_relu_setup)


def _bn_relu_pool_backward(ctx, grad_z, grad_p):
    y, scale, shift, mean = ctx.saved_tensors
    return _ops.bn_relu_pool_backward(grad_z, grad_p, y, scale, shift, mean)[: ctx.n_inputs]


torch.library.register_autograd("unetx::bn_relu_pool", _bn_relu_pool_backward, setup_context=_bn_relu_setup)


# ------------------------------------------------------------------------------------------- fallback
def _fb_bn_relu(y, scale, shift, mean=None):
    _args_bn_relu("unetx.bn_relu", y, scale, shift, mean, pool=False)
    _warn_fallback(y.device)
    return ref.bn_relu(y, scale, shift, mean).to(y.dtype).contiguous(memory_format=_layout(y))


def _fb_bn_relu_backward(grad, y, scale, shift, mean=None):
    _args_bn_relu("unetx.bn_relu_backward", y, scale, shift, mean, pool=False)
    _check_grad("unetx.bn_relu_backward", "grad", grad, "y", y, y.shape)
    return _fb_activation_grads(grad, y, scale, shift, mean)


def _fb_activation_grads(grad, y, scale, shift, mean):
    gx, gs, gt, gm = ref.bn_relu_backward(grad, y, scale, shift, mean)
    return gx.to(y.dtype).contiguous(memory_format=_layout(y)), gs.to(scale.dtype), gt.to(shift.dtype), gm


def _fb_bn_relu_pool(y, scale, shift, mean=None):
    _args_bn_relu("unetx.bn_relu_pool", y, scale, shift, mean, pool=True)
    _warn_fallback(y.device)
    fmt = _layout(y)
    z, p = ref.bn_relu_pool(y, scale, shift, mean)
    return z.to(y.dtype).contiguous(memory_format=fmt), p.to(y.dtype).contiguous(memory_format=fmt)


def _fb_bn_relu_pool_backward(grad_z, grad_p, y, scale, shift, mean=None):
    op = "unetx.bn_relu_pool_backward"
    _args_bn_relu(op, y, scale, shift, mean, pool=True)
    _check_grad(op, "grad_z", grad_z, "y", y, y.shape)
    _check_grad(op, "grad_p", grad_p, "y", y, _pooled(y))
    return _fb_activation_grads(grad_z + ref._pool_backward(grad_p), y, scale, shift, mean)


FALLBACKS = {
    "bn_relu": _fb_bn_relu,
    "bn_relu_backward": _fb_bn_relu_backward,
    "bn_relu_pool": _fb_bn_relu_pool,
    "bn_relu_pool_backward": _fb_bn_relu_pool_backward,
}

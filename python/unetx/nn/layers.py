"""The fused modules: Conv-BN-ReLU and the double conv block, state_dict-compatible with their stock twins in
`unetx.nn.reference` (same submodule names `conv`, `bn`; same parameters and buffers).

Between fused layers an activation travels *pending*: `Act(y, scale, shift, mean)` stands for
relu((y - mean) * scale + shift), where y is the previous convolution's raw output, mean its batch mean,
scale = gamma / sqrt(var + eps) and shift = beta. The next op applies it
on the fly and recomputes it in backward, so each layer keeps one activation-sized tensor (y) for backward.
`Act(z)` (no scale) is an already-activated tensor: an image, a pooled or dropped-out tensor, or an eval-mode
output whose BatchNorm was folded into the convolution.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import ops


class Act(NamedTuple):
    y: Tensor
    scale: Tensor | None = None
    shift: Tensor | None = None
    mean: Tensor | None = None

    def materialize(self) -> Tensor:
        return self.y if self.scale is None else ops.bn_relu(self.y, self.scale, self.shift, self.mean)


def _sync_batch_stats(mean: Tensor, var: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Batch statistics over every process (as nn.SyncBatchNorm): differentiable all-reduce of the moments."""
    from torch.distributed.nn.functional import all_reduce

    n = torch.full_like(mean, float(count))
    moments = torch.stack([mean * n, (var + mean * mean) * n, n])
    total = all_reduce(moments, op=dist.ReduceOp.SUM)
    g_mean = total[0] / total[2]
    g_var = (total[1] / total[2] - g_mean * g_mean).clamp_min(0)
    return g_mean, g_var


class ConvBNReLU(nn.Module):
    """Conv2d (k x k, 'same', stride 1) -> BatchNorm2d -> ReLU on the fused ops. Drop-in for
    `unetx.nn.reference.ConvBNReLU`: same constructor, same state_dict, same outputs and gradients, same running
    statistics (momentum, unbiased running variance, num_batches_tracked, momentum=None as cumulative average)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = False, sync_bn: bool = False
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels)
        self.sync_bn = sync_bn

    def forward(self, x: Tensor) -> Tensor:
        return self.pending(Act(x)).materialize()

    def train(self, mode: bool = True) -> ConvBNReLU:
        forget_eval_weights(self.bn)  # every eval() folds the weights afresh (see _eval_weights)
        return super().train(mode)

    def pending(self, x: Act, pool: bool = False, x2: Tensor | None = None, x2_mode: str = "none") -> Act:
        """This layer on a pending input (optionally 2x2-avg-pooled, optionally concatenated with upsample(x2))."""
        return conv_bn_relu_pending(
            x, self.conv, self.bn, pool, x2, x2_mode, sync_bn=self.sync_bn, keep_eval_weights=True
        )


def conv_bn_relu_pending(
    x: Act,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    pool: bool = False,
    x2: Tensor | None = None,
    x2_mode: str = "none",
    sync_bn: bool = False,
    keep_eval_weights: bool = False,
) -> Act:
    """Conv2d -> BatchNorm2d -> ReLU of stock modules' parameters on the fused op, BatchNorm semantics included
    (batch statistics and running-stat updates in training, folded running statistics in eval). With
    keep_eval_weights, the eval fold is kept across calls (_eval_weights): for layers whose train() drops it
    (ConvBNReLU); a converted model's stock modules have no such hook and fold on every call."""
    # under torch.autocast the op casts its data to the autocast dtype itself (unetx.ops.autocast)
    xy, weight, bias = x.y, conv.weight, conv.bias
    gamma = bn.weight if bn.affine else torch.ones(bn.num_features, device=weight.device, dtype=torch.float32)
    beta = bn.bias if bn.affine else torch.zeros_like(gamma)
    if bn.training or bn.running_mean is None:
        y, mean, var = ops.conv_bn_relu(
            xy,
            weight,
            bias,
            x_scale=x.scale,
            x_shift=x.shift,
            x_mean=x.mean,
            x_pool=pool,
            x2=x2,
            x2_mode=x2_mode,
            stats=True,
        )
        count = y.numel() // y.shape[1]
        if sync_bn and bn.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            mean, var = _sync_batch_stats(mean, var, count)
            count *= dist.get_world_size()
        if bn.training and bn.running_mean is not None:
            _update_running_stats(bn, mean.detach(), var.detach(), count)
        return Act(y, gamma * torch.rsqrt(var + bn.eps), beta, mean)
    # eval: BatchNorm folded into the convolution, ReLU fused; the output is already activated
    w, b = _eval_weights(conv, bn, gamma, beta, keep_eval_weights)
    y, _, _ = ops.conv_bn_relu(
        xy,
        w,
        b,
        x_scale=x.scale,
        x_shift=x.shift,
        x_mean=x.mean,
        x_pool=pool,
        x2=x2,
        x2_mode=x2_mode,
        stats=False,
        relu=True,
    )
    return Act(y)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, gamma: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    s = gamma * torch.rsqrt(bn.running_var + bn.eps)
    w = conv.weight * s.view(-1, 1, 1, 1)
    b = beta - bn.running_mean * s
    if conv.bias is not None:
        b = b + conv.bias * s
    return w, b


# False: eval layers fold their weights on every call (bench/eval_weights.py measures both ways). What is already kept
# stays until the layer's train()/eval() or its end: set it before the first eval call to keep nothing.
KEEP_EVAL_WEIGHTS = True


class _Kept(NamedTuple):
    """A layer's folded (and autocast-cast) eval weight and bias, and what they were folded from: each tensor's
    identity and its storage's, held weakly (a freed one cannot pass for a new one at its address, and nothing is
    kept alive), and the state that changes in place (version) or through `.data =` (storage, strides, dtype)."""

    state: tuple
    refs: tuple
    w: Tensor
    b: Tensor
    release: weakref.finalize  # drops w's held Winograd transforms when the layer goes


# bn -> _Kept: refolding, casting and transforming an eval layer's weight are weight-sized passes on every call,
# which matter most at the deepest levels, where weights are largest and activations smallest.
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state(tensors: list[Tensor], bn: nn.BatchNorm2d, device_type: str) -> tuple:
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return (bn.eps, dtype) + tuple(
        (t._version, t.storage_offset(), t.shape, t.stride(), t.dtype, t.device) for t in tensors
    )


def _keepable(tensors: list[Tensor]) -> bool:
    """Whether kept weights may stand in for folding now: not while tracing (torch.compile / export / jit.trace
    fold in their graph; fx proxies, fake and subclass tensors have no storage to tell a change by), not for
    inference tensors (no version counter), not while a parameter is differentiated, not during a CUDA graph capture
    (which must record the fold)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not KEEP_EVAL_WEIGHTS:
        return False
    if any(type(t) not in (Tensor, nn.Parameter) or t.is_inference() for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return not (tensors[0].is_cuda and torch.cuda.is_current_stream_capturing())


def _eval_weights(
    conv: nn.Conv2d, bn: nn.BatchNorm2d, gamma: Tensor, beta: Tensor, keep: bool
) -> tuple[Tensor, Tensor]:
    """The eval layer's folded weight and bias. With `keep` (unetx's own layers), kept across calls where
    _keepable, and folded again when a parameter or running statistic changes (in place, or replaced, or given new
    storage, layout or dtype), when the autocast dtype changes, and at the layer's train()/eval() (ConvBNReLU.train:
    the one way to make a change through `.data`, which bumps no version, seen)."""
    tensors = [
        t for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None
    ]
    if not keep or not _keepable(tensors):
        return _fold(conv, bn, gamma, beta)
    device_type = conv.weight.device.type
    state = _state(tensors, bn, device_type)
    kept = _KEPT.get(bn)
    if (
        kept is not None
        and kept.state == state
        and all(rt() is t and rs() is t.untyped_storage() for t, (rt, rs) in zip(tensors, kept.refs))
    ):
        return kept.w, kept.b
    forget_eval_weights(bn)
    # a normal tensor even under inference_mode: a frozen model may later be differentiated in its input
    with torch.inference_mode(False), torch.no_grad():
        w, b = ops.autocast.conv_operands(_fold(conv, bn, gamma, beta), device_type)
    ops.hold_weight_transforms(w)
    release = weakref.finalize(bn, ops.release_weight_transforms, w)
    release.atexit = False
    refs = tuple((weakref.ref(t), weakref.ref(t.untyped_storage())) for t in tensors)
    _KEPT[bn] = _Kept(state, refs, w, b, release)
    return w, b


def forget_eval_weights(bn: nn.BatchNorm2d) -> None:
    """Drop the folded weights kept for `bn`'s layer and their held transforms (the next eval call folds again)."""
    kept = _KEPT.pop(bn, None)
    if kept is not None and kept.release.detach() is not None:
        ops.release_weight_transforms(kept.w)


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    bn.num_batches_tracked.add_(1)
    # momentum=None is BatchNorm's cumulative average; a tensor factor keeps torch.compile free of graph breaks
    momentum = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.to(bn.running_mean.dtype)
    unbiased = var * (count / max(count - 1, 1))
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
    bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)


class DoubleConv(nn.Module):
    """Two ConvBNReLU (a U-Net level); state_dict-compatible with `unetx.nn.reference.DoubleConv`."""

    def __init__(self, in_channels: int, out_channels: int, sync_bn: bool = False):
        super().__init__()
        self.block1 = ConvBNReLU(in_channels, out_channels, sync_bn=sync_bn)
        self.block2 = ConvBNReLU(out_channels, out_channels, sync_bn=sync_bn)

    def forward(self, x: Tensor) -> Tensor:
        return self.pending(Act(x)).materialize()

    def pending(self, x: Act, pool: bool = False, x2: Tensor | None = None, x2_mode: str = "none") -> Act:
        return self.block2.pending(self.block1.pending(x, pool, x2, x2_mode))

"""The building blocks, unetx against stock PyTorch, at CPU-S's U-Net stages (batch 4; first, middle and last level).

Each case is a pair run back to back with the same inputs: unetx's op and the stock-PyTorch composition it
replaces (the definitions in unetx.reference, i.e. the stock modules and functions a plain U-Net uses), in three
forms: eager NCHW, eager channels_last, torch.compile on channels_last inputs. Passes: "forward" (training mode,
autograd recording) and "forward+backward". extra_info holds the bytes autograd saves for backward (eager forms).

    pytest bench/bench_ops.py --threads 2
"""

from __future__ import annotations

import pytest
import torch
import unetx
from unetx import ops, reference
from unetx.bench import saved_bytes

BATCH = 4
ROUNDS = 5
# CPU-S (base 32, 256x256): level i has 32 * 2**i channels at 256 / 2**i pixels
LEVEL = {i: (32 * 2**i, 256 // 2**i) for i in range(5)}
FORMS = [("eager", "nchw"), ("eager", "channels_last"), ("compile", "channels_last")]
PASSES = ["forward", "forward+backward"]


def _fmt(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _t(*shape, layout="nchw", lo=None) -> torch.Tensor:
    """Random leaf tensor requiring grad (positive in [lo, lo + 1) when lo is given)."""
    t = torch.rand(*shape) + lo if lo is not None else torch.randn(*shape)
    if t.dim() == 4:
        t = t.contiguous(memory_format=_fmt(layout))
    return t.requires_grad_()


# ------------------------------------------------------------------------------------------- the cases
def conv_bn_relu(impl: str, level: int, layout: str):
    """The fused layer as a drop-in module (unetx.ConvBNReLU) vs Conv2d + BatchNorm2d + ReLU, training mode."""
    c, hw = LEVEL[level]
    m = (unetx.ConvBNReLU if impl == "unetx" else reference.ConvBNReLU)(c, c)
    m.load_state_dict(reference.ConvBNReLU(c, c).state_dict())
    m = m.to(memory_format=_fmt(layout)).train()
    return m, (_t(BATCH, c, hw, hw, layout=layout),), list(m.parameters())


def avg_pool2x2(impl: str, level: int, layout: str):
    c, hw = LEVEL[level]
    return (ops.avg_pool2x2 if impl == "unetx" else reference.avg_pool2x2), (_t(BATCH, c, hw, hw, layout=layout),), []


def bn_relu_pool(impl: str, level: int, layout: str):
    """The encoder epilogue: skip activation relu((y - mean) * scale + shift) and its 2x2 average pool."""
    c, hw = LEVEL[level]
    args = (_t(BATCH, c, hw, hw, layout=layout), _t(c, lo=0.5), _t(c), _t(c))
    return (ops.bn_relu_pool if impl == "unetx" else reference.bn_relu_pool), args, []


def upsample_concat(impl: str, level: int, layout: str, mode: str):
    """The decoder's skip join: cat([skip, upsample2x(x)]) vs F.interpolate + torch.cat."""
    c, hw = LEVEL[level]
    args = (_t(BATCH, c, hw, hw, layout=layout), _t(BATCH, c, hw // 2, hw // 2, layout=layout))
    fn = ops.upsample_concat if impl == "unetx" else reference.upsample_concat
    return (lambda skip, x: fn(skip, x, mode)), args, []


def _upsample(mode):
    def make(impl, level, layout):
        return upsample_concat(impl, level, layout, mode)

    return make


BLOCKS = {
    "conv_bn_relu": (conv_bn_relu, [0, 2, 4]),
    "avg_pool2x2": (avg_pool2x2, [0, 2, 3]),
    "bn_relu_pool": (bn_relu_pool, [0, 2, 3]),
    "upsample_concat-nearest": (_upsample("nearest"), [0, 2, 3]),
    "upsample_concat-bilinear": (_upsample("bilinear"), [0, 2, 3]),
}


def _params():
    # impl innermost: the two sides of a pair run back to back
    out = []
    for block, (_, levels) in BLOCKS.items():
        for level in levels:
            for how, layout in FORMS:
                for pass_ in PASSES:
                    for impl in ("unetx", "stock"):
                        marks = [pytest.mark.compile] if how == "compile" else []
                        out.append(
                            pytest.param(
                                block,
                                level,
                                how,
                                layout,
                                pass_,
                                impl,
                                marks=marks,
                                id=f"{block}-L{level}-{how}-{layout}-{pass_}-{impl}",
                            )
                        )
    return out


@pytest.mark.parametrize("block, level, how, layout, pass_, impl", _params())
def bench_block(benchmark, block, level, how, layout, pass_, impl):
    make, _ = BLOCKS[block]
    fn, inputs, params = make(impl, level, layout)
    leaves = list(inputs) + params
    with torch.no_grad():
        probe = fn(*inputs)
    outs = probe if isinstance(probe, tuple) else (probe,)
    cotangents = [torch.randn_like(o) for o in outs]
    run = torch.compile(fn) if how == "compile" else fn

    def forward():
        return run(*inputs)

    def forward_backward():
        for t in leaves:
            t.grad = None
        o = run(*inputs)
        torch.autograd.backward(o if isinstance(o, tuple) else (o,), cotangents)

    c, hw = LEVEL[level]
    benchmark.group = f"{block} level {level} ({BATCH}x{c}x{hw}x{hw}) {pass_} {how} {layout}"
    if how == "eager":
        act, _ = saved_bytes(forward, params)
        benchmark.extra_info["saved_for_backward_bytes"] = act
    benchmark.pedantic(
        forward if pass_ == "forward" else forward_backward,
        rounds=ROUNDS,
        warmup_rounds=2 if how == "compile" else 1,
        iterations=1,
    )

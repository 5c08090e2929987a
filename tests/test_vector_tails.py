"""The CPU passes' vector paths for every channel count, in the reduced-precision dtypes autocast uses.

A channels-last pass works kSize channels at a time (csrc/cpu/vec.h: 32 lanes of bfloat16 / float16 with AVX-512, 16
with AVX2) and then a partial chunk: at most half a vector (one 256-bit load, one conversion) or more. Channel
counts below pick each path on either CPU kind (whole chunks only, a tail of at most half a vector, a longer one: 28
and 60 for AVX2's 16 lanes, 60 for AVX-512's 32, tails alone). A longer bfloat16 tail on AVX2 has its lanes in
another order than a half one (vec.h, Lanes::kUnpacked), as do the per-channel vectors read with it. A bfloat16 /
float16 pass computes in float32 and rounds once, so its outputs and gradients must equal the float32 pass on the
same rounded inputs, rounded: one rounding apart at most. A NaN placed in the last channel (always in a tail chunk
where there is one) must come through as in float32.
"""

from __future__ import annotations

import pytest
import torch
from unetx import ops

CHANNELS = [3, 16, 17, 28, 32, 40, 48, 60, 64]
DTYPES = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # one rounding, relative to the value


def cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def inputs(c: int, dtype: torch.dtype, nan: bool):
    g = torch.Generator().manual_seed(c)
    y = torch.randn(2, c, 6, 10, generator=g)
    if nan:
        y[1, c - 1, 3, 5] = float("nan")
    vec = dict(
        scale=torch.rand(c, generator=g) + 0.5,
        shift=torch.randn(c, generator=g) * 0.5,
        mean=torch.randn(c, generator=g) * 0.1,
    )
    return cl(y.to(dtype)), {k: v.requires_grad_() for k, v in vec.items()}


def run(name: str, y: torch.Tensor, vec: dict, reduced: torch.dtype):
    """(outputs, gradients) of one op on y (a leaf); the cotangents are values of the `reduced` dtype."""
    y = y.detach().requires_grad_()
    v = {k: t.detach().requires_grad_() for k, t in vec.items()}
    if name.startswith("upsample_concat"):
        mode = name.rsplit("_", 1)[1]
        low = y[:, :, ::2, ::2] if mode != "none" else y.flip(1)
        skip, low = y, cl(low).detach().requires_grad_()
        out = (ops.upsample_concat(skip, low, mode),)
        leaves = [skip, low]
    elif name == "avg_pool2x2":
        out, leaves = (ops.avg_pool2x2(y),), [y]
    else:
        out = ops.bn_relu(y, **v) if name == "bn_relu" else ops.bn_relu_pool(y, **v)
        out = out if isinstance(out, tuple) else (out,)
        leaves = [y, *v.values()]
    g = torch.Generator().manual_seed(1)
    cots = [cl(torch.randn(o.shape, generator=g).to(reduced).to(o.dtype)) for o in out]
    grads = torch.autograd.grad(out, leaves, cots)
    return out, grads


def close(actual: torch.Tensor, f32: torch.Tensor, rel: float, what: str, floor: float = 1e-3):
    expect = f32.to(actual.dtype).float()
    torch.testing.assert_close(
        actual.float(),
        expect,
        rtol=rel,
        atol=rel * floor * max(expect.nan_to_num().abs().max().item(), 1.0),
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


# A NaN goes through the activations' own arithmetic (ReLU keeps it, the pool averages it); upsampling moves it
# like any value (tests/test_nonfinite.py).
OPS = [
    "bn_relu",
    "bn_relu_pool",
    "avg_pool2x2",
    "upsample_concat_none",
    "upsample_concat_nearest",
    "upsample_concat_bilinear",
]
CASES = [(name, nan) for name in OPS for nan in ([False, True] if not name.startswith("upsample") else [False])]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=["bf16", "f16"])
@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("name,nan", CASES, ids=[f"{n}-{'nan' if v else 'finite'}" for n, v in CASES])
def test_reduced_precision_equals_float32_rounded(name, nan, c, dtype):
    y, vec = inputs(c, dtype, nan)
    out, grads = run(name, y, vec, dtype)
    out32, grads32 = run(name, y.float(), vec, dtype)
    rel = DTYPES[dtype]
    for i, (a, b) in enumerate(zip(out, out32)):
        assert a.dtype == dtype and a.is_contiguous(memory_format=torch.channels_last)
        close(a, b, rel, f"{name} C={c} output {i}")
    for i, (a, b) in enumerate(zip(grads, grads32)):
        # the float32 per-channel gradients sum in another order (two vectors per chunk, not one)
        if a.dtype == dtype:
            close(a, b, rel, f"{name} C={c} grad {i}")
        else:  # float32 per-channel sums (scale, shift, mean): the same terms, another order
            close(a, b, 1e-5, f"{name} C={c} grad {i}", floor=10.0)

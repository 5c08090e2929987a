"""The ops' one autocast rule (unetx.ops.autocast): a direct call under torch.autocast casts as the stock op it fuses
would, gradients reach the float32 inputs, and the rule traces under torch.compile."""

from __future__ import annotations

import torch
from unetx import ops
from unetx import reference as ref


def _conv_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g)
    w = torch.randn(4, 3 + 2, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True)
    x2 = torch.randn(2, 2, 4, 4, generator=g)
    scale = torch.rand(3, generator=g) + 0.5
    shift = torch.randn(3, generator=g)
    return x, w, b, x2, scale, shift


def test_conv_bn_relu_casts_its_data_like_a_convolution():
    x, w, b, x2, scale, shift = _conv_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, mean, var = ops.conv_bn_relu(x, w, b, x_scale=scale, x_shift=shift, x2=x2, x2_mode="nearest")
        stock, _, _ = ref.conv_bn_relu(x, scale, shift, False, x2, "nearest", w, b, False, True, False)
    assert y.dtype == stock.dtype == torch.bfloat16
    assert mean.dtype == var.dtype == torch.float32  # batch statistics accumulate in float32
    exact, _, _ = ref.conv_bn_relu(
        x.double(),
        scale.double(),
        shift.double(),
        False,
        x2.double(),
        "nearest",
        w.double(),
        b.double(),
        False,
        True,
        False,
    )
    err = (y.double() - exact).abs().max().item()
    err_stock = (stock.double() - exact).abs().max().item()
    assert err <= 2 * err_stock + 1e-2, (err, err_stock)
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    assert torch.isfinite(w.grad).all()


def test_statistics_vectors_keep_float32():
    x, w, b, x2, scale, shift = _conv_inputs()
    seen = {}

    def spy(*args):
        seen.update(x=args[0].dtype, x_scale=args[1].dtype, x2=args[4].dtype, weight=args[6].dtype)
        return torch.ops.unetx.conv_bn_relu.default(*args)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        args = ops.autocast._lower_precision((x, scale, shift, False, x2, "nearest", w, b), "cpu", (0, 4, 6, 7))
    spy(*args, False, True, False)
    assert seen == dict(x=torch.bfloat16, x_scale=torch.float32, x2=torch.bfloat16, weight=torch.bfloat16)


def test_upsample_concat_promotes_like_cat():
    skip = torch.randn(1, 2, 8, 8, dtype=torch.bfloat16)
    x = torch.randn(1, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.upsample_concat(skip, x, "nearest")
        stock = torch.cat([skip, torch.nn.functional.interpolate(x, scale_factor=2.0)], 1)
    assert out.dtype == stock.dtype == torch.float32
    torch.testing.assert_close(out, ref.upsample_concat(skip.float(), x, "nearest"))


def test_elementwise_ops_keep_their_dtype():
    y = torch.randn(1, 2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.bn_relu(y, torch.ones(2), torch.zeros(2)).dtype == torch.float32
        assert ops.avg_pool2x2(y).dtype == torch.float32
        z, p = ops.bn_relu_pool(y, torch.ones(2), torch.zeros(2))
        assert z.dtype == p.dtype == torch.float32


def test_no_cast_outside_autocast_or_for_float64():
    x, w, b, x2, _, _ = _conv_inputs()
    assert ops.conv_bn_relu(x, w, b, x2=x2, x2_mode="nearest")[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.conv_bn_relu(x.double(), w.double().detach(), b.double().detach(), x2=x2.double(), x2_mode="nearest")
    assert y[0].dtype == torch.float64


def test_rule_traces_under_compile():
    torch._dynamo.reset()
    x, w, b, x2, _, _ = _conv_inputs()
    w, b = w.detach(), b.detach()

    def f(x, w, b):
        return ops.conv_bn_relu(x, w, b, x2=x2, x2_mode="nearest", relu=True, stats=False)[0]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = f(x, w, b)
        compiled = torch.compile(f, fullgraph=True)(x, w, b)
    assert compiled.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager)

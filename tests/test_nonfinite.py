"""NaN and Inf through every unetx op and the UNet exactly as through their stock compositions (unetx.reference).

torch.relu keeps a NaN (and its backward passes the gradient through it), avg_pool of +Inf and -Inf is NaN, a NaN in
a batch makes that channel's batch statistics NaN. A fused ReLU written as `r > 0 ? r : 0` turns NaN into 0: one NaN
pixel then gave a finite training loss while the weights' gradients and the running statistics became NaN, so a
loss-based divergence guard could not see it. Elements that are NaN / +Inf / -Inf in the stock result must be exactly
those in ours; the finite ones agree as in the per-op tests. tests/test_fuzz.py searches the same property at random.
"""

from __future__ import annotations

import pytest
import torch
import unetx
from conftest import check_close_nonfinite, device_param, randn, randomise_batchnorm, to_layout
from unetx import ops
from unetx import reference as ref

NAN, INF = float("nan"), float("inf")
TOL = {torch.float64: 1e-10, torch.float32: 5e-5}
POISONS = {"nan": [NAN], "inf": [INF], "-inf": [-INF], "mixed": [NAN, INF, -INF]}


def poison(t: torch.Tensor, values, gen) -> torch.Tensor:
    """t with each value written at one random element (all in the first sample: the second stays finite)."""
    t = t.clone()
    flat = t[0].reshape(-1)
    for v, i in zip(values, torch.randperm(flat.numel(), generator=gen)[: len(values)]):
        flat[i] = v
    t[0] = flat.view(t[0].shape)
    return t


def compare(op_call, ref_call, inputs: dict, dtype, device, layout, what):
    """Outputs and the gradients of every input, by autograd through the op and through the reference (float64)."""
    gen = torch.Generator().manual_seed(1)
    ours_in = {
        k: None
        if v is None
        else to_layout(v.to(device=device, dtype=dtype), layout).requires_grad_()
        if v.dim() == 4
        else v.to(device=device, dtype=dtype).requires_grad_()
        for k, v in inputs.items()
    }
    exact_in = {k: None if v is None else v.double().requires_grad_() for k, v in inputs.items()}
    ours, exact = op_call(ours_in), ref_call(exact_in)
    ours = ours if isinstance(ours, tuple) else (ours,)
    exact = exact if isinstance(exact, tuple) else (exact,)
    live = [i for i, e in enumerate(exact) if e.numel()]
    for i in live:
        check_close_nonfinite(ours[i], exact[i], TOL[dtype], f"{what}: output {i}")
    cots = [randn(*exact[i].shape, gen=gen) for i in live]
    names = [k for k, v in inputs.items() if v is not None]
    g_ours = torch.autograd.grad(
        sum((ours[i].double() * c.to(device)).sum() for i, c in zip(live, cots)),
        [ours_in[k] for k in names],
        allow_unused=True,
    )
    g_exact = torch.autograd.grad(
        sum((exact[i] * c).sum() for i, c in zip(live, cots)), [exact_in[k] for k in names], allow_unused=True
    )
    for k, a, e in zip(names, g_ours, g_exact):
        assert (a is None) == (e is None), f"{what}: grad {k} on one side only"
        if e is not None:
            check_close_nonfinite(a, e, TOL[dtype], f"{what}: grad {k}")


def vectors(c, gen, with_mean=True):
    return dict(
        scale=torch.rand(c, dtype=torch.float64, generator=gen) + 0.5,
        shift=randn(c, std=0.5, gen=gen, dtype=torch.float64),
        mean=randn(c, std=0.3, gen=gen, dtype=torch.float64) if with_mean else None,
    )


@device_param
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("kind", list(POISONS))
@pytest.mark.parametrize("op", ["bn_relu", "bn_relu_pool", "avg_pool2x2", "upsample_concat"])
def test_elementwise_ops_propagate_like_stock(op, kind, layout, dtype, device):
    gen = torch.Generator().manual_seed(0)
    if op in ("bn_relu", "bn_relu_pool"):
        inputs = dict(y=poison(randn(2, 5, 6, 8, gen=gen, dtype=torch.float64), POISONS[kind], gen), **vectors(5, gen))
        fns = lambda f: lambda t: getattr(f, op)(t["y"], t["scale"], t["shift"], t["mean"])
    elif op == "avg_pool2x2":
        inputs = dict(x=poison(randn(2, 3, 6, 8, gen=gen, dtype=torch.float64), POISONS[kind], gen))
        fns = lambda f: lambda t: f.avg_pool2x2(t["x"])
    else:
        inputs = dict(
            skip=poison(randn(2, 3, 6, 8, gen=gen, dtype=torch.float64), POISONS[kind], gen),
            x=poison(randn(2, 4, 3, 4, gen=gen, dtype=torch.float64), POISONS[kind], gen),
        )
        fns = lambda f: lambda t: f.upsample_concat(t["skip"], t["x"], "bilinear")
    compare(fns(ops), fns(ref), inputs, dtype, device, layout, f"{op} {kind}")


CONV_CASES = {
    # name: (x channels, input stage, pool, x2 mode, k, transposed, stats, relu)
    "train-act": (3, "mean", False, None, 3, False, True, False),
    "train-act-pool": (5, "mean", True, None, 3, False, True, False),
    "train-wide-act": (17, "scale", False, None, 3, False, True, False),  # unetx's own weight gradient
    "train-x2-nearest": (4, "mean", False, "nearest", 3, False, True, False),
    "eval-relu": (3, "scale", False, None, 3, False, False, True),
    "transposed": (6, "mean", False, None, 2, True, False, False),
}


@device_param
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("kind", list(POISONS))
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_bn_relu_propagates_like_stock(case, kind, layout, dtype, device):
    cin, act, pool, mode, k, transposed, stats, relu = CONV_CASES[case]
    gen = torch.Generator().manual_seed(0)
    h, w = 8, 12
    x = poison(randn(2, cin, h, w, gen=gen, dtype=torch.float64, mean=0.3), POISONS[kind], gen)
    inputs = dict(
        x=x, **(vectors(cin, gen, act == "mean") if act != "none" else dict(scale=None, shift=None, mean=None))
    )
    hh, ww = (h // 2, w // 2) if pool else (h, w)
    c2 = 3 if mode else 0
    inputs["x2"] = randn(2, c2, hh // 2, ww // 2, gen=gen, dtype=torch.float64) if mode else None
    cout = 4
    shape = (cin + c2, cout, k, k) if transposed else (cout, cin + c2, k, k)
    inputs["weight"] = randn(*shape, std=(k * k * (cin + c2)) ** -0.5, gen=gen, dtype=torch.float64)
    inputs["bias"] = randn(cout, gen=gen, dtype=torch.float64) if relu or transposed else None
    m = mode or "none"

    def call_ops(t):
        return ops.conv_bn_relu(
            t["x"],
            t["weight"],
            t["bias"],
            x_scale=t["scale"],
            x_shift=t["shift"],
            x_mean=t["mean"],
            x_pool=pool,
            x2=t["x2"],
            x2_mode=m,
            transposed=transposed,
            stats=stats,
            relu=relu,
        )

    def call_ref(t):
        return ref.conv_bn_relu(
            t["x"], t["scale"], t["shift"], pool, t["x2"], m, t["weight"], t["bias"], transposed, stats, relu, t["mean"]
        )

    compare(call_ops, call_ref, inputs, dtype, device, layout, f"conv_bn_relu {case} {kind}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(POISONS))
def test_unet_loss_gradients_and_running_stats_like_stock(kind, train):
    """One bad pixel: stock gives a NaN loss in training; so must unetx (it gave a finite 0.508 before)."""
    torch.manual_seed(0)
    r = ref.UNet(1, 2, base_channels=4, depth=2)
    randomise_batchnorm(r)
    u = unetx.UNet.from_reference(r).double()
    r = r.double()
    r.train(train)
    u.train(train)
    gen = torch.Generator().manual_seed(0)
    x = poison(randn(2, 1, 16, 16, gen=gen, dtype=torch.float64), POISONS[kind], gen)
    target = torch.randint(0, 2, (2, 16, 16), generator=gen)
    losses = []
    for net in (r, u):
        loss = torch.nn.functional.cross_entropy(net(x), target)
        loss.backward()
        losses.append(loss)
    check_close_nonfinite(losses[1], losses[0], 1e-9, "loss")
    for (name, p1), p2 in zip(r.named_parameters(), u.parameters()):
        check_close_nonfinite(p2.grad, p1.grad, 1e-8, f"grad {name}")
    for (name, b1), b2 in zip(r.named_buffers(), u.buffers()):
        if b1.is_floating_point():
            check_close_nonfinite(b2, b1, 1e-9, name)


@pytest.mark.parametrize("kind", list(POISONS))
def test_fallback_backward_ops_pass_gradients_through_nan_like_autograd(kind):
    """The closed-form backward the stock fallback (ops.FALLBACKS, devices without unetx kernels) runs: a NaN
    pre-activation passes its gradient, as torch.relu's backward (threshold_backward: zero only where <= 0)."""
    gen = torch.Generator().manual_seed(0)
    y = poison(randn(2, 3, 4, 6, gen=gen, dtype=torch.float64), POISONS[kind], gen).requires_grad_()
    v = vectors(3, gen)
    grad = randn(2, 3, 4, 6, gen=gen, dtype=torch.float64)
    expect = torch.autograd.grad((ref.bn_relu(y, v["scale"], v["shift"], v["mean"]) * grad).sum(), y)[0]
    gy = ops.FALLBACKS["bn_relu_backward"](grad, y.detach(), v["scale"], v["shift"], v["mean"])[0]
    check_close_nonfinite(gy, expect, 1e-12, "bn_relu_backward fallback")

    w = randn(4, 3, 3, 3, gen=gen, dtype=torch.float64, std=0.3).requires_grad_()
    out, _, _ = ref.conv_bn_relu(y, None, None, False, None, "none", w, None, False, False, True)
    g_out = randn(*out.shape, gen=gen, dtype=torch.float64)
    expect = torch.autograd.grad((out * g_out).sum(), (y, w))
    got = ops.FALLBACKS["conv_bn_relu_backward"](
        g_out,
        None,
        None,
        y.detach(),
        None,
        None,
        False,
        None,
        "none",
        w.detach(),
        False,
        False,
        out.detach(),
        out.new_empty(0),
        True,
        [True, False, True, False],
    )
    check_close_nonfinite(got[0], expect[0], 1e-12, "conv_bn_relu_backward fallback: grad x")
    check_close_nonfinite(got[4], expect[1], 1e-12, "conv_bn_relu_backward fallback: grad weight")


@pytest.mark.parametrize("where", ["last column", "first column", "grad border"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_own_weight_gradient_leaves_nan_where_stock_does(dtype, where):
    """unetx's channels-last weight gradient (csrc/cpu/conv_weight_grad.cpp, >= 16 input channels) takes a GEMM over
    shifted pixel rows and subtracts the products of pixels that wrapped around a row end: a NaN there cannot be
    subtracted (NaN - NaN), though stock never reads that pixel for that tap. And stock multiplies the zero padding,
    so a NaN output gradient at the border makes the taps that read padding NaN, which skipping the padding does not."""
    gen = torch.Generator().manual_seed(0)
    x = randn(2, 17, 5, 6, gen=gen, dtype=torch.float64)
    g = randn(2, 4, 5, 6, gen=gen, dtype=torch.float64)
    if where == "last column":
        x[0, 3, 2, 5] = NAN
    elif where == "first column":
        x[1, 0, 3, 0] = NAN
    else:
        g[0, 1, 0, 2] = NAN
    w = randn(4, 17, 3, 3, std=0.1, gen=gen, dtype=torch.float64)
    cl = torch.channels_last
    t = [v.to(dtype).contiguous(memory_format=cl).requires_grad_() for v in (x, w)]
    s = [v.to(dtype).contiguous(memory_format=cl).requires_grad_() for v in (x, w)]
    y, _, _ = ops.conv_bn_relu(t[0], t[1], None, stats=False)
    ys, _, _ = ref.conv_bn_relu(s[0], None, None, False, None, "none", s[1], None, False, False, False)
    gy = g.to(dtype).contiguous(memory_format=cl)
    gx, gw = torch.autograd.grad(y, t, gy)
    gxs, gws = torch.autograd.grad(ys, s, gy)
    check_close_nonfinite(gw, gws, TOL[dtype], "grad weight")
    check_close_nonfinite(gx, gxs, TOL[dtype], "grad x")


@pytest.mark.parametrize("value", [INF, -INF])
@pytest.mark.parametrize("position", ["first", "later"])
def test_batch_statistics_of_an_infinite_element_are_batchnorms(value, position):
    """The batch mean is accumulated around a pivot, the channel's first element: an infinite pivot made every
    difference Inf - Inf = NaN, where nn.BatchNorm2d's mean (and so its running mean) is +-Inf. (One channel: a
    convolution mixing channels would multiply the Inf by a zero weight.)"""
    gen = torch.Generator().manual_seed(0)
    x = randn(2, 1, 4, 5, gen=gen)
    x[0, 0, 0, 0 if position == "first" else 3] = value
    y, mean, var = ops.conv_bn_relu(x, torch.full((1, 1, 1, 1), 2.0), None, stats=True)  # y = 2x
    running_mean, running_var = torch.zeros(1), torch.ones(1)
    torch.nn.functional.batch_norm(y, running_mean, running_var, training=True, momentum=1.0)
    check_close_nonfinite(mean, running_mean, 1e-6, "mean")
    assert torch.isnan(var[0]) and torch.isnan(running_var[0])

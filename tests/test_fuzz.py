"""Property-based search (hypothesis): every unetx op, and unetx.UNet, equals its stock composition
(unetx.reference) on random shapes, flags, memory layouts (NCHW, channels_last, channel slices of a larger buffer,
permuted) and dtypes (float32, float64, bfloat16), with NaN and +-Inf written into the inputs.

The property: outputs, every gradient and the running statistics agree with the float64 reference within the
per-op tests' tolerances (bfloat16: within 2x stock's own bfloat16 error); the elements that are NaN / +Inf / -Inf
are those of stock at the same dtype; a configuration stock refuses is refused with the same exception type.
Where stock itself is not one thing, the property accepts what stock does in any of its forms, and says why at
each place: ATen's convolutions differ between layouts and between float32 (oneDNN, skips the zero padding in the
forward) and float64 (multiplies it) on NaN x 0; with +-Inf in the inputs, batch statistics are NaN or +-Inf
depending on the algorithm (only which elements are non-finite is compared); +-Inf in a scale or weight is not
drawn (the closed-form backward computes sum(g * scale) as scale * sum(g)); bfloat16 convolutions with NaN inputs
are drawn as float32 (oneDNN spreads a NaN within its blocked layouts, for stock as for unetx).

Profiles (registered in tests/conftest.py):
    python -m pytest tests/test_fuzz.py                               # "fast", the default: 20 + 5 examples
    python -m pytest tests/test_fuzz.py --hypothesis-profile=long     # 10,000 op examples + 2,500 UNet examples
(or HYPOTHESIS_PROFILE=long; "medium" is 500 + 125). --hypothesis-show-statistics prints how many ran.
tests/test_ops_random_configs.py draws fixed configurations; tests/test_nonfinite.py holds hand-picked NaN cases.
"""

from __future__ import annotations

import copy

import pytest

hypothesis = pytest.importorskip("hypothesis")

import torch  # noqa: E402
import unetx  # noqa: E402
from conftest import check_nonfinite_pattern, randomise_batchnorm  # noqa: E402
from hypothesis import given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_ops_random_configs import LAYOUTS, in_layout  # noqa: E402
from unetx import ops  # noqa: E402
from unetx import reference as ref  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
TOL = {torch.float64: 1e-10, torch.float32: 5e-5}
BF16_RATIO, BF16_FLOOR = 2.0, 2.0**-7
NONFINITE = [float("nan"), float("inf"), -float("inf")]


def _kinds(t: torch.Tensor, kinds: bool) -> torch.Tensor:
    t = t.detach().cpu().double()
    k = torch.zeros(t.shape, dtype=torch.int8)
    k[torch.isnan(t)], k[torch.isposinf(t)], k[torch.isneginf(t)] = 1, 2, 3
    return k if kinds else (k > 0).to(torch.int8)


def check(
    actual: torch.Tensor,
    exact: torch.Tensor,
    stock: torch.Tensor,
    dtype,
    what: str,
    tol=None,
    kinds=True,
    patterns: list | None = None,
    alternatives: list | None = None,
    spread: int = 0,
):
    """Non-finite elements (NaN, +Inf, -Inf; with kinds=False only which are non-finite) as stock's at the same dtype
    or, elementwise, as one of `patterns` (stock in other layouts or float32: stock's own convolution backends
    differ on NaN x zero padding and within their blocked layouts); finite ones within tol of `exact` (float32/64)
    or near stock's own bfloat16 error. `alternatives`: other stock results (same dtype) the values may match
    instead of exact's. `spread`: bfloat16 elements allowed off besides the few of the input stage's own ReLU (an
    output ReLU's mask flips, times the input elements each one reads)."""
    if not patterns:
        check_nonfinite_pattern(actual, stock, what, kinds)
    else:
        ka = _kinds(actual, kinds)
        bad = torch.ones(ka.shape, dtype=torch.bool)
        for p in [stock, *patterns]:
            bad &= ka != _kinds(p, kinds)
        if bad.any():
            at = tuple(bad.nonzero()[0].tolist())
            raise AssertionError(
                f"{what}: {int(bad.sum())} elements non-finite unlike stock's in any layout, first "
                f"at {list(at)}: ours {actual[at].item()}, stock {stock[at].item()}"
            )
    finite = (
        torch.isfinite(actual.detach().cpu())
        & torch.isfinite(stock.detach().cpu())
        & torch.isfinite(exact.detach().cpu())
    )
    if not finite.any():
        return
    a, e = actual.detach().cpu().double()[finite], exact.detach().cpu().double()[finite]
    s = stock.detach().cpu().double()[finite]
    scale = max(e.abs().max().item(), 1e-30)
    err = (a - e).abs().max().item()
    stock_err = (s - e).abs().max().item()
    if dtype == torch.bfloat16:
        # a per-channel reduction (grad of scale/shift/mean/bias) of bfloat16 terms often cancels to a value much
        # smaller than its terms; stock's own error there swings with rounding luck, so the floor is wider (the
        # per-op tests hold these on fixed inputs)
        floor = BF16_FLOOR if actual.dim() == 4 else 0.1
        bound = BF16_RATIO * stock_err + floor * scale
        # ReLU's mask flips where a pre-activation is within bfloat16 rounding of 0 (unetx rounds its input stage
        # once, stock after each op): that element gets the whole gradient or none, and passes it to every input
        # element it reads. A few such elements are allowed.
        over = int(((a - e).abs() > bound).sum())
        assert over <= max(8, a.numel() // 50) + spread, (
            f"{what}: {over} elements over {BF16_RATIO} x stock's error {stock_err:.3g} + floor (max error {err:.3g})"
        )
    else:
        # within tol of the largest value, or (ill-conditioned cases: batch statistics of 2 values) at most 4x
        # stock's own error at the same dtype
        near_alt = any(
            (a - alt.detach().cpu().double()[finite]).abs().max().item() / scale <= (tol or TOL[dtype])
            for alt in alternatives or []
        )
        assert err / scale <= (tol or TOL[dtype]) or err <= 4 * stock_err or near_alt, (
            f"{what}: max error {err / scale:.3g} of the largest finite value, stock's {stock_err / scale:.3g}"
        )


# ------------------------------------------------------------------------------------------------ the ops
@st.composite
def op_case(draw):
    """(op name, flags, {name: float64 tensor}, {name: layout}) with NaN/Inf written into some inputs."""
    op = draw(st.sampled_from(["conv_bn_relu"] * 3 + ["bn_relu", "bn_relu_pool", "avg_pool2x2", "upsample_concat"]))
    n, c = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3, 5, 8, 16, 17]))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    values, flags = {}, {}

    def tensor(name, *shape, std=1.0, mean=0.0, positive=False):
        t = torch.randn(*shape, dtype=torch.float64, generator=gen) * std + mean
        values[name] = t.abs() + 0.5 if positive else t

    def vectors(ch, with_mean):
        tensor("scale", ch, positive=True)
        tensor("shift", ch, std=0.5)
        if with_mean:
            tensor("mean", ch, std=0.3)

    if op in ("bn_relu", "bn_relu_pool"):
        if op == "bn_relu_pool":
            h, w = 2 * max(1, h // 2), 2 * max(1, w // 2)
        tensor("y", n, c, h, w, std=2.0, mean=0.5)
        vectors(c, draw(st.booleans()))
    elif op == "avg_pool2x2":
        tensor("x", n, c, 2 * max(1, h // 2), 2 * max(1, w // 2))
    elif op == "upsample_concat":
        flags["mode"] = draw(st.sampled_from(["none", "nearest", "bilinear"]))
        f = 1 if flags["mode"] == "none" else 2
        tensor("skip", n, c, f * h, f * w)
        tensor("x", n, draw(st.sampled_from([1, 2, 3, 7])), h, w)
    else:
        pool = draw(st.booleans())
        x2_mode = draw(st.sampled_from(["none", "nearest", "bilinear", None]))
        even = 4 if pool and x2_mode in ("nearest", "bilinear") else 2 if pool or x2_mode else 1
        h, w = even * max(1, h // even), even * max(1, w // even)
        hh, ww = (h // 2, w // 2) if pool else (h, w)
        transposed = draw(st.booleans()) and not x2_mode
        k = 2 if transposed else draw(st.sampled_from([1, 3, 5]))
        count = n * hh * ww * (k * k if transposed else 1)
        stats = draw(st.booleans()) and not transposed
        relu = not stats and draw(st.booleans())
        act = draw(st.sampled_from(["none", "scale", "mean"]))
        mode, c2 = x2_mode or "none", (draw(st.sampled_from([1, 2, 3, 6])) if x2_mode else 0)
        f = 1 if mode == "none" else 2
        cout = draw(st.sampled_from([1, 2, 3, 4, 7, 16]))
        tensor("x", n, c, h, w, mean=0.3)
        if act != "none":
            vectors(c, act == "mean")
        if c2:
            tensor("x2", n, c2, hh // f, ww // f)
        wshape = (c + c2, cout, k, k) if transposed else (cout, c + c2, k, k)
        tensor("weight", *wshape, std=(k * k * (c + c2)) ** -0.5)
        if draw(st.booleans()):
            tensor("bias", cout)
        flags.update(pool=pool, mode=mode, transposed=transposed, stats=stats, relu=relu, count=count)
    # NaN / +Inf / -Inf at a few elements of the activations; NaN also in a per-channel vector or the weight. An
    # infinite scale or weight is outside the property: the closed-form backward computes sum(g * scale) as
    # scale * sum(g), which is -Inf where stock's order gives NaN (Inf - Inf); such parameters have diverged anyway.
    names = sorted(values)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(names))
        t = values[name].view(-1)
        data = name in ("x", "y", "skip", "x2")
        t[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(NONFINITE if data else NONFINITE[:1]))
    layouts = {k: draw(st.sampled_from(LAYOUTS)) for k, v in values.items() if v.dim() == 4}
    if "weight" in values:
        layouts["weight"] = draw(st.sampled_from(["nchw", "channels_last"]))
    return op, flags, values, layouts


def call(fns, op, flags, t):
    g = t.get
    if op == "conv_bn_relu":
        if fns is ops:
            return ops.conv_bn_relu(
                t["x"],
                t["weight"],
                g("bias"),
                x_scale=g("scale"),
                x_shift=g("shift"),
                x_mean=g("mean"),
                x_pool=flags["pool"],
                x2=g("x2"),
                x2_mode=flags["mode"],
                transposed=flags["transposed"],
                stats=flags["stats"],
                relu=flags["relu"],
            )
        return ref.conv_bn_relu(
            t["x"],
            g("scale"),
            g("shift"),
            flags["pool"],
            g("x2"),
            flags["mode"],
            t["weight"],
            g("bias"),
            flags["transposed"],
            flags["stats"],
            flags["relu"],
            g("mean"),
        )
    if op in ("bn_relu", "bn_relu_pool"):
        return getattr(fns, op)(t["y"], t["scale"], t["shift"], g("mean"))
    if op == "avg_pool2x2":
        return fns.avg_pool2x2(t["x"])
    return fns.upsample_concat(t["skip"], t["x"], flags["mode"])


def as_tuple(r):
    return tuple(r) if isinstance(r, (tuple, list)) else (r,)


def inputs(values, layouts, dtype, use_layouts=True):
    out = {}
    for k, v in values.items():
        v = v.to(dtype)
        out[k] = (in_layout(v, layouts[k]) if use_layouts and k in layouts else v.clone()).requires_grad_()
    return out


def run(fns, op, flags, t, cots=None, gen=None):
    """Outputs (or the exception type) and the gradients of every input for random finite cotangents."""
    try:
        outs = as_tuple(call(fns, op, flags, t))
    except (RuntimeError, ValueError) as e:
        return type(e), None, None, None
    live = [i for i, o in enumerate(outs) if o.numel()]
    if cots is None:
        cots = [torch.randn(outs[i].shape, dtype=torch.float64, generator=gen) for i in live]
    names = list(t)
    grads = torch.autograd.grad(
        sum((outs[i].double() * c).sum() for i, c in zip(live, cots)), [t[k] for k in names], allow_unused=True
    )
    return outs, live, cots, dict(zip(names, grads))


@given(case=op_case(), dtype=st.sampled_from(DTYPES))
def test_op_equals_its_stock_composition(case, dtype):
    op, flags, values, layouts = case
    poisoned = any(not torch.isfinite(v).all() for v in values.values())
    if dtype == torch.bfloat16 and op == "conv_bn_relu" and flags["stats"] and flags["count"] < 4:
        dtype = torch.float32  # bfloat16 variance of 2-3 values: stock's own error is the whole value
    if dtype == torch.bfloat16 and op == "conv_bn_relu" and poisoned:
        # oneDNN's bfloat16 convolutions spread a NaN within their blocked layouts (a 1x1 convolution of a
        # channels-last input gave NaN at a neighbouring pixel, for stock as for unetx, which calls it): which
        # elements are NaN there is the backend's, not a property of unetx
        dtype = torch.float32
    note(f"{op} {dtype} {flags} shapes {[tuple(v.shape) for v in values.values()]} layouts {layouts}")
    values = {k: v.to(dtype).double() for k, v in values.items()}  # exact = float64 on the values ours gets
    gen = torch.Generator().manual_seed(0)
    exact_out, live, cots, g_exact = run(ref, op, flags, inputs(values, layouts, torch.float64, False), gen=gen)
    ours_out, _, _, g_ours = run(ops, op, flags, inputs(values, layouts, dtype), cots)
    if op == "conv_bn_relu" and flags["stats"] and flags["count"] == 1:
        assert ours_out is ValueError  # one value per channel: refused as nn.BatchNorm2d refuses it
        return
    if isinstance(exact_out, type) or isinstance(ours_out, type):
        assert ours_out == exact_out, f"unetx: {ours_out}, stock: {exact_out}"
        return
    stock_out, _, _, g_stock = run(ref, op, flags, inputs(values, layouts, dtype), cots)
    alternatives = []
    if poisoned:
        # stock in the other layouts (unetx runs its input stage in x's layout, the reference concatenates in
        # whatever torch.cat picks) and, for bfloat16 data that unetx computes in float32, stock in float32
        for lay in ("nchw", "channels_last"):
            alt = run(ref, op, flags, inputs(values, {k: lay for k in layouts}, dtype), cots)
            alternatives.append((alt[0], alt[3]))
        f32 = run(ref, op, flags, inputs(values, layouts, torch.float32), cots) if dtype == torch.bfloat16 else None
        if f32 is not None:
            alternatives.append((f32[0], f32[3]))
        # NaN x zero padding: float64 convolutions (slow_conv2d) multiply the padding, float32 oneDNN skips it in the
        # forward: with NaN/Inf in the inputs the values to match are stock's at the same dtype (float32 for
        # bfloat16 data), not float64's
        exact_out, g_exact = (f32[0], f32[3]) if f32 is not None else (stock_out, g_stock)
    # against stock at the same dtype the finite elements left can be small beside the rounding of the sums they
    # come from (1 ulp of a larger partial sum was 6e-5 of the largest finite float32 value): a wider tolerance
    tol = {torch.float32: 1e-3, torch.float64: 1e-9}.get(dtype) if poisoned else None
    # Batch statistics of a tensor holding +-Inf: stock's var_mean (Welford) gives a mean of NaN or +-Inf depending
    # on where the Inf is, nn.BatchNorm2d's CPU statistics (a sum) +-Inf, and var_mean's backward recomputes the
    # mean by a sum; ours is a sum (as BatchNorm2d). The same elements are non-finite; their kind (NaN or Inf) is
    # compared only without Inf in the inputs.
    kinds = not any(torch.isinf(v).any() for v in values.values())
    # An eval layer's output ReLU (relu=True) flips where y is within bfloat16 rounding of 0: that output element's
    # gradient is passed or not, to each of the k x k x C_in input elements it reads (one flip gave 10 elements of
    # grad x2 off, 2 channels x 3 x 3).
    spread = 0
    if dtype == torch.bfloat16 and op == "conv_bn_relu" and flags["relu"] and ours_out[0].numel():
        flips = int(((ours_out[0].detach().double() > 0) != (exact_out[0].detach().double() > 0)).sum())
        w = values["weight"]
        spread = flips * w.shape[2] * w.shape[3] * w.shape[0 if flags["transposed"] else 1]
    for i in live:
        assert ours_out[i].dtype == (dtype if ours_out[i].dim() == 4 else ours_out[i].dtype)
        check(
            ours_out[i],
            exact_out[i],
            stock_out[i],
            dtype,
            f"output {i}",
            tol,
            kinds=kinds,
            patterns=[alt[0][i] for alt in alternatives],
            alternatives=[alt[0][i] for alt in alternatives],
        )
    for k in g_exact:
        a, e = g_ours[k], g_exact[k]
        assert (a is None) == (e is None), f"grad {k} on one side only"
        if e is not None:
            assert a.shape == e.shape and a.dtype == dtype, f"grad {k}: {a.shape} {a.dtype}"
            # values too may be stock's in another layout: which elements a NaN weight reaches through the zero
            # padding differs between ATen's NCHW and channels-last convolutions, and so does the ReLU mask after it
            check(
                a,
                e,
                g_stock[k],
                dtype,
                f"grad {k}",
                tol,
                kinds=kinds,
                patterns=[alt[1][k] for alt in alternatives],
                alternatives=[alt[1][k] for alt in alternatives],
                spread=spread if g_ours[k].dim() == 4 else 0,
            )


# ------------------------------------------------------------------------------------------------- the UNet
@st.composite
def unet_case(draw):
    cfg = dict(
        in_channels=draw(st.integers(1, 3)),
        out_channels=draw(st.integers(1, 3)),
        base_channels=draw(st.integers(1, 6)),
        depth=draw(st.integers(1, 3)),
        pool=draw(st.sampled_from(["avg", "max"])),
        upsample=draw(st.sampled_from(["transpose", "nearest", "bilinear"])),
    )
    shape = (draw(st.integers(1, 3)), cfg["in_channels"], draw(st.integers(1, 24)), draw(st.integers(1, 24)))
    poison = [
        (draw(st.floats(0, 1, exclude_max=True)), draw(st.sampled_from(NONFINITE)))
        for _ in range(draw(st.integers(0, 2)))
    ]
    return (
        cfg,
        shape,
        poison,
        draw(st.booleans()),
        draw(st.sampled_from(["nchw", "channels_last"])),
        draw(st.integers(0, 2**31 - 1)),
    )


def _unet_step(net, x, cot):
    try:
        out = net(x)
    except (RuntimeError, ValueError, TypeError) as e:
        return type(e), None
    (out * cot).sum().backward() if cot is not None else None
    return out, x.grad


@settings(max_examples=max(5, settings().max_examples // 4))  # a UNet example costs ~10 op examples
@given(case=unet_case(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_unet_equals_its_stock_twin(case, dtype):
    cfg, shape, poison, train, layout, seed = case
    m = 2 ** cfg["depth"]
    if dtype == torch.float32 and shape[0] * -(-shape[2] // m) * -(-shape[3] // m) < 4:
        # batch statistics of 2-3 values at the bottleneck: float32 gradients through them are ill-conditioned
        # (unetx's and stock's errors differ by 6x at random); such cases run in float64
        dtype = torch.float64
    note(f"{cfg} input {shape} {dtype} {layout} train={train} poison {poison}")
    torch.manual_seed(seed)
    r = ref.UNet(**cfg)
    randomise_batchnorm(r)
    u = unetx.UNet.from_reference(r).to(dtype)
    r = r.double()
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for frac, v in poison:
        x.view(-1)[int(frac * x.numel())] = v
    x = x.to(dtype).double()  # exact = float64 on the values ours gets
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    s = copy.deepcopy(r).to(dtype)  # stock at unetx's dtype: whose NaN/Inf elements ours must have
    for net in (r, u, s):
        net.train(train)
        net.to(memory_format=fmt)
    xr = x.clone().requires_grad_()
    xs = x.to(dtype).contiguous(memory_format=fmt).clone().requires_grad_()  # a leaf of its own: x.to(x.dtype) is x
    xu = x.to(dtype).contiguous(memory_format=fmt).clone().requires_grad_()
    exact, _ = _unet_step(r, xr, None)
    if isinstance(exact, type):
        ours, _ = _unet_step(u, xu, None)
        assert ours == exact, f"unetx: {ours}, stock: {exact}"
        return
    cot = torch.randn(exact.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (exact * cot).sum().backward()
    stock, _ = _unet_step(s, xs, cot.to(dtype))
    # and stock in the other layout: unetx runs channels-last on the CPU whatever the input's layout, and ATen's
    # convolutions differ between layouts on NaN x zero padding in the weight gradient
    other = torch.contiguous_format if fmt == torch.channels_last else torch.channels_last
    s2 = copy.deepcopy(r).to(dtype).train(train).to(memory_format=other)
    xs2 = x.to(dtype).contiguous(memory_format=other).clone().requires_grad_()
    stock2, _ = _unet_step(s2, xs2, cot.to(dtype))
    ours, _ = _unet_step(u, xu, cot.to(dtype))
    assert not isinstance(stock, type), f"stock raised {stock} in {dtype}, not in float64"
    assert not isinstance(ours, type), f"unetx raised {ours}, stock ran"
    tol = {torch.float64: 1e-8, torch.float32: 1e-4}[dtype]
    kinds = all(v != v for _, v in poison)  # with +-Inf: see test_op_equals_its_stock_composition
    if poison:  # values: stock's at the same dtype (see test_op_equals_its_stock_composition)
        r, xr, exact = s, xs, stock
    check(ours, exact, stock, dtype, "output", tol, patterns=[stock2], alternatives=[stock2])
    # values may also be stock's in the other layout: max pooling breaks ties (replicate-padded columns) by position,
    # differently in NCHW and channels-last, and unetx runs channels-last on the CPU (found by the long run)
    check(xu.grad, xr.grad, xs.grad, dtype, "grad input", 10 * tol, kinds, patterns=[xs2.grad], alternatives=[xs2.grad])
    for (name, p1), p2, p3, p4 in zip(r.named_parameters(), u.parameters(), s.parameters(), s2.parameters()):
        check(
            p2.grad,
            p1.grad,
            p3.grad,
            dtype,
            f"grad {name}",
            20 * tol,
            kinds,
            patterns=[p4.grad],
            alternatives=[p4.grad],
        )
    for (name, b1), b2, b3, b4 in zip(r.named_buffers(), u.buffers(), s.buffers(), s2.buffers()):
        if b1.is_floating_point():
            check(b2, b1, b3, dtype, name, tol, patterns=[b4])

"""The CPU Winograd convolutions (csrc/cpu/winograd.cpp): torch.ops.unetx.winograd_conv3x3, its input gradient and
its weight gradient, F(4x4,3x3) and F(2x2,3x3), against torch's conv2d in float64.

Accuracy bar (flash-attention style, measured in BENCHMARKS.md "CPU Winograd"): the kernel's max-abs error against
the float64 reference is at most K[tile] times stock float32's (oneDNN, channels-last) on the same inputs, plus a
floor of 2^-23 times the largest reference value for problems so small that stock is exact. Winograd F(4x4) rounds
through transforms with entries up to 8 (and 1/24 in the weight transform): its error is about 1e-5 of the largest
output whatever the shape, 4-20x stock's on 32x32 images and up to ~48x on tiny (5x7) images with many channels,
where stock's is unusually small; bound 64x. F(2x2) is as accurate as the direct convolution (measured up to 3x),
bound 4x.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import unetx  # registers torch.ops.unetx
from conftest import max_err

ops = torch.ops.unetx
aten = torch.ops.aten
CL = torch.channels_last
CONV = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
K = {4: 64.0, 2: 4.0}
TILES = [4, 2]

# (N, C_in, C_out, H, W): odd sizes (not multiples of the tile), 1x1 and 1-wide images, 1..64 channels (with
# channel counts that are not multiples of the 16-lane transform step), several blocks of tiles per thread, and
# transformed weights large enough (> 8 MiB) for the shared-block path
SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 3, 5, 3, 5),
    (1, 1, 32, 5, 5),
    (2, 32, 3, 1, 8),
    (1, 17, 17, 7, 9),
    (2, 32, 32, 13, 11),
    (1, 64, 64, 10, 6),
    (2, 32, 32, 40, 36),
    (1, 33, 48, 9, 1),
    (1, 384, 384, 5, 7),
]


def inputs(n, c, co, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=CL)
    gy = torch.randn(n, co, h, w, generator=g).contiguous(memory_format=CL)
    wt = torch.randn(co, c, 3, 3, generator=g) / (9 * c) ** 0.5
    return x, gy, wt


def references(x, gy, wt):
    xd, wd = x.double().requires_grad_(), wt.double().requires_grad_()
    y = F.conv2d(xd, wd, padding=1)
    y.backward(gy.double())
    return {"forward": y.detach(), "input_grad": xd.grad, "weight_grad": wd.grad}


def stock(x, gy, wt):
    wcl = wt.contiguous(memory_format=CL)
    return {
        "forward": aten.convolution(x, wcl, None, *CONV),
        "input_grad": aten.convolution_backward(gy, x, wcl, None, *CONV, [True, False, False])[0],
        "weight_grad": aten.convolution_backward(gy, x, wcl, None, *CONV, [False, True, False])[1],
    }


def winograd(x, gy, wt, tile):
    return {
        "forward": ops.winograd_conv3x3(x, wt, tile),
        "input_grad": ops.winograd_conv3x3_input_grad(gy, wt, tile),
        "weight_grad": ops.winograd_conv3x3_weight_grad(gy, x, tile),
    }


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_within_bound(shape, tile):
    x, gy, wt = inputs(*shape)
    refs, base, ours = references(x, gy, wt), stock(x, gy, wt), winograd(x, gy, wt, tile)
    for name, ref in refs.items():
        assert ours[name].shape == ref.shape and ours[name].dtype == torch.float32, name
        floor = 2.0**-23 * ref.abs().max().item()
        err, err_stock = max_err(ours[name], ref), max_err(base[name], ref)
        assert err <= K[tile] * max(err_stock, floor), (name, err, err_stock, floor)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bfloat16_within_twice_stock_bfloat16(shape, tile):
    """bfloat16 operands and results (what the layers get under CPU bf16 autocast), transforms and tile products in
    float32 inside: the error against float64 (of the same bfloat16 inputs) is at most twice stock bfloat16's, the
    bar of the bf16 issue; the rounding of the result to bfloat16 dominates Winograd's own error."""
    x, gy, wt = (t.bfloat16() for t in inputs(*shape))
    refs, base, ours = references(x, gy, wt), stock(x, gy, wt), winograd(x, gy, wt, tile)
    for name, ref in refs.items():
        assert ours[name].shape == ref.shape and ours[name].dtype == torch.bfloat16, name
        floor = 2.0**-8 * ref.abs().max().item()  # stock exact (tiny problems): half a bfloat16 ulp of the largest
        err, err_stock = max_err(ours[name], ref), max_err(base[name], ref)
        assert err <= 2 * max(err_stock, floor), (name, err, err_stock, floor)


@pytest.mark.parametrize("tile", TILES)
def test_layouts_and_threads(tile):
    """Planar (NCHW) and non-contiguous operands give the channels-last result; one thread gives the same."""
    x, gy, wt = inputs(2, 20, 24, 11, 10)
    want = winograd(x, gy, wt, tile)
    got = winograd(x.contiguous(), gy.contiguous(), wt.contiguous(memory_format=CL), tile)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert got["forward"].is_contiguous(memory_format=CL) and got["input_grad"].is_contiguous(memory_format=CL)
    assert got["weight_grad"].is_contiguous()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = winograd(x, gy, wt, tile)
    finally:
        torch.set_num_threads(threads)
    ref = references(x, gy, wt)
    for name in want:  # another split of the work sums in another order: same bound, not the same bits
        assert max_err(one[name], ref[name]) <= K[tile] * max(
            max_err(stock(x, gy, wt)[name], ref[name]), 2.0**-23 * ref[name].abs().max().item()
        )


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["x", "weight", "grad_y"])
def test_nonfinite_propagates_like_stock(tile, value, where):
    """Where stock's result is NaN, Winograd's is NaN; where stock's is non-finite, Winograd's is non-finite (an Inf
    may come out as NaN: the transforms add it to itself with both signs). Winograd may spread a NaN further within
    a tile (its transforms mix the whole input window); never silently finite."""
    x, gy, wt = inputs(2, 19, 18, 9, 11)
    if where == "x":
        x[1, 3, 4, 6] = value
        x[0, 0, 0, 10] = value  # a corner pixel: read through a tile that overlaps the padding
    elif where == "weight":
        wt[5, 2, 0, 1] = value
    else:
        gy[0, 7, 8, 0] = value
        gy[1, 2, 3, 3] = value
    base, ours = stock(x, gy, wt), winograd(x, gy, wt, tile)
    for name in base:
        s, o = base[name], ours[name]
        assert not torch.isfinite(s).all() or name != "forward" or where == "grad_y", "the test must hit stock"
        assert torch.isnan(o)[torch.isnan(s)].all(), (name, "stock NaN, winograd not NaN")
        assert (~torch.isfinite(o))[~torch.isfinite(s)].all(), (name, "stock non-finite, winograd finite")


@pytest.mark.parametrize("tile", TILES)
def test_empty_and_channel_free(tile):
    x, gy, wt = inputs(0, 4, 5, 6, 7)
    assert winograd(x, gy, wt, tile)["forward"].shape == (0, 5, 6, 7)
    assert torch.equal(ops.winograd_conv3x3_weight_grad(gy, x, tile), torch.zeros(5, 4, 3, 3))
    x, gy, wt = inputs(1, 0, 3, 4, 4)
    assert torch.equal(ops.winograd_conv3x3(x, wt, tile), torch.zeros(1, 3, 4, 4))
    assert ops.winograd_conv3x3_weight_grad(gy, x, tile).shape == (3, 0, 3, 3)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, w, g: ops.winograd_conv3x3(x, w, 3), "tile must be 2 or 4"),
        (lambda x, w, g: ops.winograd_conv3x3(x.double(), w, 4), "expected float32 or bfloat16 x"),
        (lambda x, w, g: ops.winograd_conv3x3(x.bfloat16(), w, 4), "x is BFloat16 but weight is Float"),
        (lambda x, w, g: ops.winograd_conv3x3_weight_grad(g, x.bfloat16(), 4), "grad_y is Float but x is BFloat16"),
        (lambda x, w, g: ops.winograd_conv3x3(x[0], w, 4), "expected 4-D x"),
        (lambda x, w, g: ops.winograd_conv3x3(x, w[:, :, :2], 4), "expected a 3x3 weight"),
        (lambda x, w, g: ops.winograd_conv3x3(x, w[:, :2], 4), "expects 2 channels in x"),
        (lambda x, w, g: ops.winograd_conv3x3_input_grad(x, w, 4), "expects 5 channels in grad_y"),
        (lambda x, w, g: ops.winograd_conv3x3_weight_grad(g[:, :, :3], x, 4), "does not match x"),
    ],
)
def test_bad_arguments_name_the_problem(call, message):
    x, gy, wt = inputs(1, 4, 5, 6, 6)
    with pytest.raises(RuntimeError, match=message):
        call(x, wt, gy)


@pytest.fixture
def two_threads():
    """Two threads whatever the machine: the Winograd kernels then cut a single tall image into several bands of
    tile rows (one per thread at least), each built from the layer's inputs with its own halo rows."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def layer_case(stage: str, shape: tuple[int, int, int], bf16_values: bool = False):
    """conv_bn_relu's forward and backward on one input stage ('plain', 'bn_relu', 'pool', 'concat'), as a function
    of the dtype it runs in: returns {'y', 'grad_x', 'grad_w'(, 'grad_x2')}. With bf16_values, the activations,
    weight, bias and output gradient hold bfloat16 values (exact in any dtype), as under bf16 autocast."""
    g = torch.Generator().manual_seed(1)
    n, h, w = shape
    c, co = 17, 9  # >= 16 input channels: the weight gradient's candidates include Winograd
    c2 = 5 if stage == "concat" else 0
    f = 2 if stage == "pool" else 1
    x = torch.randn(n, c, f * h, f * w, generator=g).contiguous(memory_format=CL)
    x2 = torch.randn(n, c2, h // 2, w // 2, generator=g).contiguous(memory_format=CL) if c2 else None
    scale = torch.rand(c, generator=g) + 0.5 if stage != "plain" else None
    shift = torch.randn(c, generator=g) if stage != "plain" else None
    wt = (torch.randn(co, c + c2, 3, 3, generator=g) / (9 * (c + c2)) ** 0.5).contiguous(memory_format=CL)
    bias = torch.randn(co, generator=g)
    gy = torch.randn(n, co, h, w, generator=g).contiguous(memory_format=CL)
    if bf16_values:
        x, x2, wt, bias, gy = (None if t is None else t.bfloat16().float() for t in (x, x2, wt, bias, gy))

    def layer(dt, params_dt=None):
        cast = lambda t: None if t is None else t.to(dt)
        pcast = lambda t: None if t is None else t.to(params_dt or dt)
        args = (cast(x), pcast(scale), pcast(shift), stage == "pool", cast(x2), "nearest" if c2 else "none")
        y = ops.conv_bn_relu(*args, cast(wt), cast(bias), False, False, False)[0]
        grads = ops.conv_bn_relu_backward(
            cast(gy), None, None, *args, cast(wt), True, False, y, y.new_empty(0), False, [True, c2 > 0, True, True]
        )
        return {"y": y, "grad_x": grads[0], "grad_w": grads[4]} | ({"grad_x2": grads[3]} if c2 else {})

    return layer


def force(monkeypatch, algo):
    """The layer's 3x3 convolution, input gradient and weight gradient forced to one candidate: UNETX_WINOGRAD=1
    lists Winograd for small layers too, UNETX_CONV_ALGO picks one ('onednn' with unetx's GEMM weight gradient is
    the stock path)."""
    monkeypatch.setenv("UNETX_WINOGRAD", "1" if algo != "onednn" else "0")
    gw_algo = "gemm" if algo == "onednn" else algo
    monkeypatch.setenv("UNETX_CONV_ALGO", f"conv3x3_forward={algo},conv3x3_input_grad={algo},weight_grad={gw_algo}")


LAYER_SHAPES = pytest.mark.parametrize("shape", [(2, 10, 14), (1, 42, 6)], ids=["batch", "tall"])
STAGES = pytest.mark.parametrize("stage", ["plain", "bn_relu", "pool", "concat"])


@pytest.mark.parametrize("algo", ["winograd4", "winograd2", "onednn"])
@STAGES
@LAYER_SHAPES
def test_layer_uses_winograd_within_bound(monkeypatch, two_threads, algo, stage, shape):
    """conv_bn_relu with its convolutions forced to each candidate against the float64 layer, within the same bound
    as the kernels. The 'tall' image (one image, 42 rows: several bands of tile rows, the last one partial) exercises
    the kernels' band-wise building of the input stage (normalise + ReLU, pool, upsample-concat) with halo rows."""
    layer = layer_case(stage, shape)
    ref = layer(torch.float64)
    force(monkeypatch, "onednn")
    base = layer(torch.float32)
    force(monkeypatch, algo)
    got = layer(torch.float32)
    tile = {"winograd4": 4, "winograd2": 2, "onednn": 2}[algo]
    for name, r in ref.items():
        floor = 2.0**-23 * r.abs().max().item()
        err, err_base = max_err(got[name], r), max_err(base[name], r)
        assert err <= K[tile] * max(err_base, floor), (name, err, err_base)
    # the forced kernel ran: it rounds differently from oneDNN
    assert torch.equal(got["y"], base["y"]) == (algo == "onednn")
    assert torch.equal(got["grad_x"], base["grad_x"]) == (algo == "onednn")
    assert torch.equal(got["grad_w"], base["grad_w"]) == (algo == "onednn")


WEIGHT_LAYOUTS = {
    "contiguous": lambda w: w.contiguous(),
    "channels_last": lambda w: w.contiguous(memory_format=CL),
    "strided": lambda w: torch.cat([w, torch.zeros_like(w)], 1)[:, : w.shape[1]],  # a view with gaps between filters
}


@pytest.mark.parametrize("algo", ["winograd4", "winograd2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(WEIGHT_LAYOUTS))
def test_layer_reads_the_weight_in_its_own_layout(monkeypatch, two_threads, algo, dtype, layout):
    """The Winograd kernels read the weight through its strides and dtype (a model's channels-last weights, a view)
    and write the weight gradient in the parameter's own layout: the same bits as from a contiguous weight, and a
    weight gradient with the weight's strides wherever the weight is dense."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 18, 9, 11, generator=g).to(dtype).contiguous(memory_format=CL)
    wt = (torch.randn(7, 18, 3, 3, generator=g) / 12).to(dtype)
    gy = torch.randn(2, 7, 9, 11, generator=g).to(dtype).contiguous(memory_format=CL)
    force(monkeypatch, algo)

    def run(w):
        args = (x, None, None, False, None, "none")
        y = ops.conv_bn_relu(*args, w, None, False, False, False)[0]
        grads = ops.conv_bn_relu_backward(
            gy, None, None, *args, w, False, False, y, y.new_empty(0), False, [True, False, True, False]
        )
        return y, grads[0], grads[4]

    want = run(wt.contiguous())
    w = WEIGHT_LAYOUTS[layout](wt)
    assert torch.equal(w, wt)
    got = run(w)
    for name, a, b in zip(("y", "grad_x", "grad_w"), got, want):
        assert a.dtype == dtype and torch.equal(a, b), name
    if layout != "strided":
        assert got[2].stride() == w.stride()


@pytest.mark.parametrize("algo", ["winograd4", "winograd2"])
@STAGES
@LAYER_SHAPES
def test_layer_in_bfloat16_within_twice_stock(monkeypatch, two_threads, algo, stage, shape):
    """The layer as CPU bf16 autocast runs it (bfloat16 activations and weight, float32 normalisation parameters)
    with Winograd forced: error against the float64 layer on the same bfloat16 values at most twice the stock
    path's (oneDNN's bfloat16 convolutions)."""
    layer = layer_case(stage, shape, bf16_values=True)
    ref = layer(torch.float64)
    force(monkeypatch, "onednn")
    base = layer(torch.bfloat16, params_dt=torch.float32)
    force(monkeypatch, algo)
    got = layer(torch.bfloat16, params_dt=torch.float32)
    for name, r in ref.items():
        assert got[name].dtype == torch.bfloat16, name
        floor = 2.0**-8 * r.abs().max().item()
        err, err_base = max_err(got[name], r), max_err(base[name], r)
        assert err <= 2 * max(err_base, floor), (name, err, err_base)
    # No "the forced kernel ran" check here: both round a float32 result to bfloat16 once, and at these sizes the
    # Winograd error (~1e-6 relative) rarely moves a rounding; test_layer_uses_winograd_within_bound shows the same
    # forcing running the kernels in float32.


@pytest.mark.parametrize("algo", ["winograd4", "winograd2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@STAGES
def test_eval_layer_adds_bias_and_relu_in_the_output_transform(monkeypatch, two_threads, algo, dtype, stage):
    """An eval layer (BatchNorm folded into weight and bias, ReLU fused: stats=False, relu=True) with Winograd forced
    adds the bias and applies the ReLU in the output transform: within the kernels' bound of the float64 layer
    (float32; bfloat16: 2x stock's error), zero wherever the float64 result is clearly negative, and a NaN in the
    input stays NaN through the ReLU wherever stock's output is NaN."""
    g = torch.Generator().manual_seed(3)
    n, h, w, c, co = 2, 10, 14, 17, 9
    c2 = 5 if stage == "concat" else 0
    f = 2 if stage == "pool" else 1
    x = torch.randn(n, c, f * h, f * w, generator=g).bfloat16().float().contiguous(memory_format=CL)
    x2 = torch.randn(n, c2, h // 2, w // 2, generator=g).bfloat16().float().contiguous(memory_format=CL) if c2 else None
    scale = torch.rand(c, generator=g) + 0.5 if stage != "plain" else None
    shift = torch.randn(c, generator=g) if stage != "plain" else None
    wt = (torch.randn(co, c + c2, 3, 3, generator=g) / (9 * (c + c2)) ** 0.5).bfloat16().float()
    bias = torch.randn(co, generator=g).bfloat16().float()
    x[1, 3, 4, 5] = float("nan")

    def layer(dt):
        cast = lambda t: None if t is None else t.to(dt)
        pdt = torch.float64 if dt == torch.float64 else torch.float32
        pcast = lambda t: None if t is None else t.to(pdt)
        args = (cast(x), pcast(scale), pcast(shift), stage == "pool", cast(x2), "nearest" if c2 else "none")
        return ops.conv_bn_relu(*args, cast(wt).contiguous(memory_format=CL), cast(bias), False, False, True)[0]

    ref = layer(torch.float64)
    force(monkeypatch, "onednn")
    base = layer(dtype)
    force(monkeypatch, algo)
    got = layer(dtype)
    assert got.dtype == dtype and got.is_contiguous(memory_format=CL)
    nan = torch.isnan(base)
    assert nan.any() and torch.isnan(got)[nan].all()
    fin = ~torch.isnan(ref) & ~torch.isnan(got)
    r, b, o = ref[fin], base[fin], got[fin]
    if dtype == torch.float32:
        bound = K[{"winograd4": 4, "winograd2": 2}[algo]] * max(max_err(b, r), 2.0**-23 * r.abs().max().item())
    else:
        bound = 2 * max(max_err(b, r), 2.0**-8 * r.abs().max().item())
    assert max_err(o, r) <= bound, (max_err(o, r), bound)
    assert (o[r < -bound] == 0).all() and (o >= 0).all()


# (N, C, Co, H, W, stage): bands of one thread's work, a tall image (several bands per image), and a weight large
# enough for the shared-block path (transformed weight above 8 MiB for F(4x4): 36 * 256 * 240 floats)
STATS_SHAPES = {
    "bands": (2, 17, 9, 10, 14, "bn_relu"),
    "tall": (1, 17, 9, 42, 6, "plain"),
    "shared-block": (2, 256, 240, 9, 11, "plain"),
}


@pytest.mark.parametrize("offset", [0.0, 1e3], ids=["centred", "mean-1e3"])
@pytest.mark.parametrize("algo", ["winograd4", "winograd2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(STATS_SHAPES))
def test_training_layer_statistics_in_the_output_transform(monkeypatch, two_threads, shape, dtype, algo, offset):
    """A training layer (stats=True) with Winograd forced accumulates its batch statistics in the output transform:
    they are the statistics of the output it returns (float64 torch.var_mean of it), also where the mean is 1000
    standard deviations from zero (a bias of 1e3: naive float32 sums of squares would cancel)."""
    n, c, co, h, w, stage = STATS_SHAPES[shape]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=CL)
    wt = (torch.randn(co, c, 3, 3, generator=g) / (9 * c) ** 0.5).to(dtype).contiguous(memory_format=CL)
    bias = (offset + torch.randn(co, generator=g)).to(dtype) if offset else None
    scale = torch.rand(c, generator=g) + 0.5 if stage == "bn_relu" else None
    shift = torch.randn(c, generator=g) if stage == "bn_relu" else None
    force(monkeypatch, algo)
    y, mean, var = ops.conv_bn_relu(x, scale, shift, False, None, "none", wt, bias, False, True, False)
    assert mean.dtype == var.dtype == torch.float32
    ref_var, ref_mean = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    sd = ref_var.sqrt()
    assert ((mean.double() - ref_mean).abs() <= 1e-5 * sd + 1e-6 * ref_mean.abs()).all(), (mean, ref_mean)
    assert ((var.double() - ref_var).abs() <= 1e-4 * ref_var + 1e-12).all(), (var, ref_var)


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("algo", ["winograd4", "winograd2"])
def test_training_layer_statistics_of_nonfinite_outputs(monkeypatch, two_threads, algo, value):
    """Where the output holds an Inf or NaN, the statistics say so as torch.var_mean of the output does (the fused
    sums fall back to batch_stats, whose mean stays Inf rather than becoming Inf - Inf)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 17, 10, 14, generator=g).contiguous(memory_format=CL)
    x[1, 2, 3, 4] = value
    wt = (torch.randn(9, 17, 3, 3, generator=g) / 12).abs().contiguous(memory_format=CL)  # an Inf stays +Inf
    force(monkeypatch, algo)
    y, mean, var = ops.conv_bn_relu(x, None, None, False, None, "none", wt, None, False, True, False)
    ref_var, ref_mean = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    for got, ref in ((mean, ref_mean), (var, ref_var)):
        assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf()), (got, ref)
        fin = ref.isfinite()  # (every channel reads the bad pixel: none is finite here, but the check stays general)
        assert torch.allclose(got.double()[fin], ref[fin], rtol=1e-4, atol=1e-6)


def test_layer_measures_and_caches_its_choice(monkeypatch):
    """Unforced, the layer measures ATen's and the Winograd kernels once per shape and lists its decisions."""
    monkeypatch.setenv("UNETX_WINOGRAD", "1")
    monkeypatch.delenv("UNETX_CONV_ALGO", raising=False)
    unetx._C.clear_algo_choices()
    x, gy, wt = inputs(2, 16, 16, 12, 12)
    for _ in range(2):
        y = ops.conv_bn_relu(x, None, None, False, None, "none", wt, None, False, False, False)[0]
        ops.conv_bn_relu_backward(
            gy,
            None,
            None,
            x,
            None,
            None,
            False,
            None,
            "none",
            wt,
            False,
            False,
            y,
            y.new_empty(0),
            False,
            [True, False, True, False],
        )
    decisions = {d["family"]: d for d in unetx._C.algo_choices()}
    assert {"conv3x3_forward", "conv3x3_input_grad", "weight_grad"} <= set(decisions), decisions
    assert {"winograd4", "winograd2"} <= set(decisions["weight_grad"]["seconds"]), decisions["weight_grad"]
    for d in decisions.values():
        assert d["chosen"] in d["seconds"] and all(v is not None for v in d["seconds"].values()), d
    monkeypatch.setenv("UNETX_WINOGRAD", "0")
    unetx._C.clear_algo_choices()
    ops.conv_bn_relu(x, None, None, False, None, "none", wt, None, False, False, False)
    assert not [d for d in unetx._C.algo_choices() if d["family"].startswith("conv3x3_")]  # off: not measured


# ---- the Python op (unetx.ops.winograd_conv3x3): fake impls, autograd, opcheck
@pytest.mark.parametrize("tile", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_all_three_ops(tile, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 9, 7, generator=g).contiguous(memory_format=CL).to(dtype)
    w = torch.randn(6, 5, 3, 3, generator=g).to(dtype)
    gy = torch.randn(2, 6, 9, 7, generator=g).contiguous(memory_format=CL).to(dtype)
    torch.library.opcheck(ops.winograd_conv3x3.default, (x.requires_grad_(), w.requires_grad_(), tile))
    torch.library.opcheck(ops.winograd_conv3x3_input_grad.default, (gy, w.detach(), tile))
    torch.library.opcheck(ops.winograd_conv3x3_weight_grad.default, (gy, x.detach(), tile))


@pytest.mark.parametrize("tile", [4, 2])
def test_wrapper_autograd_matches_the_reference(tile):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 11, 13, generator=g).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(4, 8, 3, 3, generator=g, requires_grad=True)
    gy = torch.randn(2, 4, 11, 13, generator=g)
    y = unetx.ops.winograd_conv3x3(x, w, tile)
    y.backward(gy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = unetx.ops.reference.winograd_conv3x3(xr, wr, tile)
    yr.backward(gy.double())
    for got, ref in ((y, yr), (x.grad, xr.grad), (w.grad, wr.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert y.is_contiguous(memory_format=CL)

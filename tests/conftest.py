"""Shared helpers for the op tests (test_conv_bn_relu.py, test_bn_relu.py, test_avg_pool2x2.py,
test_upsample_concat.py, test_op_chain.py, test_op_errors.py, test_ops_compile_memory.py).

Accuracy bars:
- float32 / float64: the op against the reference evaluated in float64 on the same inputs, as a max error
  relative to the largest reference value (TOL).
- bfloat16 (flash-attention style): the op's max error against the float64 reference must be at most
  BF16_RATIO times plain PyTorch's own bfloat16 error (the same reference run in bfloat16 with stock ops),
  plus a floor of BF16_FLOOR times the largest reference value, so ties at the rounding limit do not fail.
"""

from __future__ import annotations

import os

# Every test process measures its own convolution choices (test_algo_choice.py tests the cache that keeps them
# across processes); set before anything imports unetx, inherited by the CLI subprocesses the tests run.
os.environ["UNETX_ALGO_CACHE"] = "0"

import pytest
import torch

try:  # hypothesis profiles for tests/test_fuzz.py: "fast" by default, "long" (>= 10k examples per property) by
    # `python -m pytest tests/test_fuzz.py --hypothesis-profile=long` or HYPOTHESIS_PROFILE=long
    from hypothesis import HealthCheck, settings

    _common = dict(
        deadline=None,
        derandomize=False,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile("fast", max_examples=20, **_common)
    settings.register_profile("medium", max_examples=500, **_common)
    settings.register_profile("long", max_examples=10_000, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
except ImportError:  # the fuzz suite skips itself
    pass

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LAYOUTS = ["nchw", "channels_last", "strided"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]

# max |op - exact| / max |exact|; float32 sums over a few hundred terms stay well inside 1e-5.
TOL = {torch.float64: 1e-11, torch.float32: 2e-5}
BF16_RATIO = 2.0
BF16_FLOOR = 2.0**-8  # one bfloat16 rounding of the largest value (half an ulp or more): reductions to a few values
# (batch mean/var, grad of scale/shift) compare max errors over a handful of numbers, where stock can be lucky


@pytest.fixture(autouse=True, scope="session")
def _full_float32_convolutions():
    """float32 tolerances assume float32 arithmetic: CUDA convolutions default to TF32 (10-bit mantissa)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


device_param = pytest.mark.parametrize("device", DEVICES)
layout_param = pytest.mark.parametrize("layout", LAYOUTS)
dtype_param = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in the given memory layout, as a leaf tensor.

    "strided" is neither NCHW- nor NHWC-dense: a channel-strided, width-sliced view of a permuted buffer."""
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    assert layout == "strided", layout
    n, c, h, w = t.shape
    buf = torch.empty(n, w + 2, 2 * c, h, dtype=t.dtype, device=t.device)
    view = buf.permute(0, 2, 3, 1)[:, ::2, :, 1 : w + 1]
    view.copy_(t)
    assert view.shape == t.shape and not view.is_contiguous()
    assert not view.is_contiguous(memory_format=torch.channels_last)
    return view


def randn(*shape, dtype=torch.float32, device="cpu", mean=0.0, std=1.0, gen=None) -> torch.Tensor:
    """Random normal data, generated in float64 on the CPU (the same values on every device) then cast."""
    t = torch.randn(*shape, dtype=torch.float64, generator=gen) * std + mean
    return t.to(device=device, dtype=dtype)


def rand(*shape, lo=0.5, hi=1.5, dtype=torch.float32, device="cpu", gen=None) -> torch.Tensor:
    t = torch.rand(*shape, dtype=torch.float64, generator=gen) * (hi - lo) + lo
    return t.to(device=device, dtype=dtype)


def max_err(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return (actual.double() - exact.double()).abs().max().item()


def scale_of(exact: torch.Tensor) -> float:
    return max(exact.double().abs().max().item(), 1e-30)


def check_close(actual: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """float32/float64: max error relative to the largest exact value within TOL[dtype]."""
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    rel = max_err(actual, exact) / scale_of(exact)
    assert rel <= TOL[dtype], f"{what}: max error {rel:.3g} of the largest value exceeds {TOL[dtype]:.1g}"


def stock_bound(
    stock: torch.Tensor, exact: torch.Tensor, ratio: float = BF16_RATIO, floor: float = BF16_FLOOR
) -> float:
    """The error allowed to an op whose plain-PyTorch counterpart at the same dtype has error max_err(stock, exact)."""
    return ratio * max_err(stock, exact) + floor * scale_of(exact)


def check_vs_stock(
    actual: torch.Tensor,
    stock: torch.Tensor,
    exact: torch.Tensor,
    what: str = "",
    ratio: float = BF16_RATIO,
    floor: float = BF16_FLOOR,
) -> None:
    """Our error at most ratio x plain PyTorch's error at the same dtype (+ floor), both against float64."""
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    ours, bound = max_err(actual, exact), stock_bound(stock, exact, ratio, floor)
    assert ours <= bound, f"{what}: error {ours:.3g} > {ratio} x stock error {max_err(stock, exact):.3g} + floor"


def check_outputs(ours, stock, exact, dtype, what=""):
    """check_close or check_vs_stock per dtype; None entries (no such output / no gradient) must agree."""
    for i, (a, s, e) in enumerate(zip(ours, stock, exact)):
        label = f"{what}[{i}]"
        assert (a is None) == (e is None), f"{label}: one side has no value"
        if e is None:
            continue
        assert a.shape == e.shape, f"{label}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        if e.numel() == 0:
            continue
        if dtype == torch.bfloat16:
            check_vs_stock(a, s, e, label)
        else:
            check_close(a, e, dtype, label)


def leaf(t: torch.Tensor | None, requires_grad: bool = True) -> torch.Tensor | None:
    return None if t is None else t.detach().clone().requires_grad_(requires_grad and t.is_floating_point())


def grads_of(outputs, cotangents, inputs) -> list[torch.Tensor | None]:
    """d(sum_i <outputs[i], cotangents[i]>) / d inputs (None where an input is None or not reached)."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o is not None and o.numel() > 0]
    loss = sum((o.double() * c.double()).sum() for o, c in pairs)
    live = [t for t in inputs if t is not None]
    gs = iter(torch.autograd.grad(loss, live, allow_unused=True))
    return [None if t is None else next(gs) for t in inputs]


def cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    """Fresh leaves with every floating tensor cast to dtype (non-tensors passed through)."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = leaf(v.detach().to(dtype), v.requires_grad)
        out[k] = v
    return out


def as_tuple(r) -> tuple:
    return tuple(r) if isinstance(r, (tuple, list)) else (r,)


def check_against_reference(op, reference, inputs: dict, dtype: torch.dtype, seed: int = 0):
    """op(**inputs) against reference(**inputs): outputs, and the gradients of every input that requires grad,
    by autograd through each (so the op's closed-form backward is checked against autograd of stock ops).
    Exact = the reference in float64; for bfloat16 also stock = the reference run in bfloat16."""
    gen = torch.Generator().manual_seed(seed)
    ours = as_tuple(op(**inputs))
    for o in ours:
        assert o.dtype == dtype, f"output dtype {o.dtype}, expected {dtype}"
    cots = [randn(*o.shape, gen=gen).to(dtype=o.dtype, device=o.device) for o in ours]
    names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    g_ours = grads_of(ours, cots, [inputs[k] for k in names])
    for k, g in zip(names, g_ours):
        assert g is not None and g.shape == inputs[k].shape and g.dtype == inputs[k].dtype, k
    exact_in = cast_inputs(inputs, torch.float64)
    exact = as_tuple(reference(**exact_in))
    g_exact = grads_of(exact, cots, [exact_in[k] for k in names])
    stock, g_stock = exact, g_exact
    if dtype == torch.bfloat16:
        stock_in = cast_inputs(inputs, torch.bfloat16)
        stock = as_tuple(reference(**stock_in))
        g_stock = grads_of(stock, cots, [stock_in[k] for k in names])
    check_outputs(ours, stock, exact, dtype, "outputs")
    for k, a, s, e in zip(names, g_ours, g_stock, g_exact):
        check_outputs([a], [s], [e], dtype, f"grad {k}")
    return ours, g_ours


def randomise_batchnorm(module: torch.nn.Module, bias: float = 0.5, running_stats: bool = True) -> None:
    """Non-trivial BatchNorm parameters (and running statistics), so tests cannot pass on gamma=1, beta=0."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-bias, bias)
                if running_stats:
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 2.0)


def check_nonfinite_pattern(
    actual: torch.Tensor, exact: torch.Tensor, what: str = "", kinds: bool = True
) -> torch.Tensor:
    """NaN where exact is NaN, +Inf / -Inf where it is; returns the mask of exact's finite elements.

    What stock PyTorch does with NaN and Inf (torch.relu keeps NaN, its backward passes the gradient through a NaN,
    avg_pool of +Inf and -Inf is NaN) is the spec: a fused op must give the same non-finite elements. kinds=False
    asks only for the same non-finite elements (NaN and +-Inf may differ)."""
    a, e = actual.detach().cpu().double(), exact.detach().cpu().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    tests = (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf))
    for name, f in tests if kinds else (("non-finite", lambda t: ~torch.isfinite(t)),):
        got, want = f(a), f(e)
        if not torch.equal(got, want):
            diff = (got != want).nonzero()[:3].tolist()
            raise AssertionError(
                f"{what}: {name} at {int(got.sum())} elements, stock has {int(want.sum())}; "
                f"first differences at {diff}: ours {a[tuple(zip(*diff))].tolist()}, "
                f"stock {e[tuple(zip(*diff))].tolist()}"
            )
    return torch.isfinite(e)


def check_close_nonfinite(actual: torch.Tensor, exact: torch.Tensor, tol: float, what: str = "") -> None:
    """The same non-finite elements as exact, and the finite ones within tol of the largest finite exact value."""
    finite = check_nonfinite_pattern(actual, exact, what)
    if not finite.any():
        return
    a, e = actual.detach().cpu().double()[finite], exact.detach().cpu().double()[finite]
    rel = (a - e).abs().max().item() / max(e.abs().max().item(), 1e-30)
    assert rel <= tol, f"{what}: max error {rel:.3g} of the largest finite value exceeds {tol:.1g}"

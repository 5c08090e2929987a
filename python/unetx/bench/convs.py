"""The convolution floor: the convolutions of unetx's training step recorded (shapes, layouts, output masks) and
replayed alone, the floor unetx can approach. Reaches into torch's dispatch-mode internals, which is why it lives
here and not in the package's layers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._prims_common import suggest_memory_format
from torch.utils._python_dispatch import TorchDispatchMode

from .cases import Case, _sync


def _bind(func, args, kwargs) -> dict:
    names = [a.name for a in func._schema.arguments]
    bound = {a.name: a.default_value for a in func._schema.arguments if a.has_default_value()}
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


class ConvRecorder(TorchDispatchMode):
    """Records the convolutions inside unetx's fused ops: for every unetx::conv_bn_relu (forward) and
    unetx::conv_bn_relu_backward call, the shapes, layouts, weights and output mask its convolution gets."""

    def __init__(self):
        super().__init__()
        self.forward: list[dict] = []
        self.backward: list[dict] = []
        self._out_fmt: dict[int, torch.memory_format] = {}

    @staticmethod
    def _conv_input(a: dict) -> tuple[tuple[int, ...], torch.memory_format, torch.Tensor]:
        x, x2 = a["x"], a["x2"]
        n, c, h, w = x.shape
        if a["x_pool"]:
            h, w = h // 2, w // 2
        if x2 is not None:
            c += x2.shape[1]
        return (n, c, h, w), suggest_memory_format(x), x

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.unetx.conv_bn_relu.default:
            a = _bind(func, args, kwargs or {})
            shape, fmt, x = self._conv_input(a)
            self.forward.append(
                dict(
                    shape=shape,
                    fmt=fmt,
                    dtype=x.dtype,
                    # an eval layer's kept weight (nn.layers._eval_weights) is recorded and replayed as itself: its
                    # held Winograd transform is then used as the layer uses it, where a copy (detach() too: another
                    # TensorImpl) would be transformed on every call
                    weight=a["weight"] if not a["weight"].requires_grad else a["weight"].detach(),
                    kept=not a["weight"].requires_grad,
                    bias=None if a["bias"] is None else a["bias"].detach(),
                    transposed=a["transposed"],
                )
            )
            self._out_fmt[a["weight"].data_ptr()] = suggest_memory_format(out[0])
        elif func is torch.ops.unetx.conv_bn_relu_backward.default:
            a = _bind(func, args, kwargs or {})
            shape, fmt, x = self._conv_input(a)
            mask = list(a["output_mask"])
            need_input = mask[0] or (mask[1] and a["x2"] is not None)
            g = a["grad_y"]
            # the gradient in the layout the forward produced y in: what the convolution needs, whatever layout
            # the gradient arrives in (a conversion on the way is overhead above this floor)
            grad_fmt = self._out_fmt.get(a["weight"].data_ptr(), suggest_memory_format(g))
            self.backward.append(
                dict(
                    shape=shape,
                    fmt=fmt,
                    dtype=x.dtype,
                    weight=a["weight"].detach(),
                    grad_shape=tuple(g.shape),
                    grad_fmt=grad_fmt,
                    has_bias=a["has_bias"],
                    transposed=a["transposed"],
                    mask=[need_input, mask[2], a["has_bias"] and mask[3]],
                )
            )
        return out


def _randn(shape, fmt, dtype, device) -> torch.Tensor:
    return torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)


def conv_replay(rec: ConvRecorder, device: torch.device) -> Callable[[], None]:
    """A function that runs the recorded convolutions (forward, then backward in reverse order) on random inputs of
    the recorded shapes and layouts, each computed as the fused op computes it (unetx's Winograd, transposed and
    weight-gradient kernels or oneDNN's, as it chooses per shape): the convolution work of the recorded step
    alone."""
    fwd, bwd = [], []
    for r in rec.forward:
        wt = r["weight"] if r["kept"] else r["weight"].clone()
        fwd.append((_randn(r["shape"], r["fmt"], r["dtype"], device), wt, r["bias"], r["transposed"]))
    for r in reversed(rec.backward):
        bwd.append(
            (
                _randn(r["grad_shape"], r["grad_fmt"], r["dtype"], device),
                _randn(r["shape"], r["fmt"], r["dtype"], device),
                r["weight"].clone(),
                r["has_bias"],
                r["transposed"],
                r["mask"],
            )
        )
    none = torch.empty(0, device=device)

    def run() -> None:
        with torch.no_grad():
            # the forward convolutions as the fused op computes them (its measured choice per shape: unetx's
            # Winograd or oneDNN's), with no input stage, statistics or ReLU: the op's convolution work alone
            for a, wt, b, tr in fwd:
                torch.ops.unetx.conv_bn_relu(a, None, None, False, None, "none", wt, b, tr, False, False)
            # the backward convolutions as the fused op computes them (its measured choices: unetx's Winograd or
            # ATen's input gradient, unetx's or oneDNN's weight gradient), on an input with no input stage and an
            # output gradient with nothing to fold: the op's convolution work alone
            for g, a, wt, has_bias, tr, mask in bwd:
                torch.ops.unetx.conv_bn_relu_backward(
                    g,
                    None,
                    None,
                    a,
                    None,
                    None,
                    False,
                    None,
                    "none",
                    wt,
                    has_bias,
                    tr,
                    none,
                    none,
                    False,
                    [mask[0], False, mask[1], mask[2]],
                )
        _sync(device)

    return run


def record_convs(case: Case) -> ConvRecorder:
    """The convolutions of one step of an eager unetx case (train: forward and backward; eval: forward)."""
    rec = ConvRecorder()
    with rec:
        case.step()
    if not rec.forward:
        raise RuntimeError(
            f"unetx bench: recorded no unetx convolutions in {case.form.name} on {case.device}; "
            "is this a unetx eager form?"
        )
    return rec

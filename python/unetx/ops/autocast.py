"""The one autocast rule of the unetx ops, as an Autocast dispatch-key kernel per op (what torchvision's
csrc/ops/autocast/ does in C++, and torch.library.register_autocast in Python). Every call under torch.autocast -
from unetx.nn's modules or straight to an op - casts here, like the stock op each one fuses:

- conv_bn_relu is a convolution: its data (x, x2, weight, bias) runs in the autocast dtype, as F.conv2d. The
  per-channel vectors (x_scale, x_shift, x_mean: BatchNorm statistics) keep their dtype, as BatchNorm keeps float32
  statistics under autocast; the kernels take float32 vectors beside lower-precision data.
- upsample_concat is a concatenation: skip and x promote to the wider dtype, as torch.cat.
- bn_relu, bn_relu_pool and avg_pool2x2 get no rule: they run in their input's dtype, as relu and avg_pool2d.
- Backward ops get no rule: autograd runs them in the dtypes the forward saw.

torch.library.register_autocast itself does not fit: it casts every floating-point input (the statistics too) to
one dtype fixed at registration, where autocast's dtype is the caller's choice.
"""

from __future__ import annotations

import torch

from . import _extension  # noqa: F401  (loads the ops this registers for)

_DEVICES = ("cpu", "cuda")
_lib = torch.library.Library("unetx", "IMPL")


def _eligible(t, device_type: str) -> bool:
    # as ATen's autocast: float64 is never cast, nor a tensor on another device type
    return (
        isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and t.dtype != torch.float64
        and t.device.type == device_type
    )


def _lower_precision(args: tuple, device_type: str, indices: tuple[int, ...]) -> tuple:
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        a.to(dtype) if i in indices and _eligible(a, device_type) and a.dtype != dtype else a
        for i, a in enumerate(args)
    )


def conv_operands(tensors: tuple, device_type: str) -> tuple:
    """`tensors` as conv_bn_relu's autocast rule casts its data under the autocast state of now (unchanged outside
    autocast): for callers that keep cast operands across calls (unetx.nn's eval layers)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    return _lower_precision(tensors, device_type, tuple(range(len(tensors))))


def _promote(args: tuple, device_type: str, indices: tuple[int, ...]) -> tuple:
    tensors = [args[i] for i in indices if _eligible(args[i], device_type)]
    if not tensors:
        return args
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(
        a.to(dtype) if i in indices and _eligible(a, device_type) and a.dtype != dtype else a
        for i, a in enumerate(args)
    )


# op -> (how it casts, the positions of the tensors it casts)
RULES = {
    "conv_bn_relu": (_lower_precision, (0, 4, 6, 7)),  # x, x2, weight, bias (schema order, csrc/registration.cpp)
    "upsample_concat": (_promote, (0, 1)),  # skip, x
}


def _register(name: str, device_type: str) -> None:
    cast, indices = RULES[name]
    op = getattr(torch.ops.unetx, name).default
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def autocast_impl(*args):
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*cast(args, device_type, indices))

    # the Python-dispatcher twin is what tracing (torch.compile, make_fx) calls; the dispatcher calls the kernel
    op.py_impl(getattr(torch._C.DispatchKey, key))(autocast_impl)
    _lib.impl(name, lambda _keyset, *args: autocast_impl(*args), key, with_keyset=True)


for _name in RULES:
    for _device in _DEVICES:
        _register(_name, _device)

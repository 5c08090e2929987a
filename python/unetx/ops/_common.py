"""What every op module shares: the argument checks of the fake impls and fallbacks (the same checks and messages
as the kernels' csrc/common/checks.h and csrc/ops.cpp), output allocation, and the fallback's one warning."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

# The one private torch import of the package: the fake impls must give their outputs exactly the strides the
# kernels give theirs, and the kernels choose them with c10's suggest_memory_format, whose Python twin this is.
from torch._prims_common import suggest_memory_format as _suggest_memory_format

from ._extension import BUILD_INFO

_ops = torch.ops.unetx


def memory_format(t: Tensor) -> torch.memory_format:
    """The memory format the unetx kernels give an output computed from t (channels_last or contiguous)."""
    return _suggest_memory_format(t)


_layout = memory_format


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(shape, like: Tensor, fmt: torch.memory_format, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


# Argument checks, the same as the kernels' (csrc/common/checks.h, csrc/ops.cpp), with the same messages: every op,
# forward and backward, checks every argument's device, dtype and shape in its fake impl and in its fallback too
# (a call mixing meta and CPU tensors lands in the fake impl, a CUDA one without CUDA kernels in the fallback).
_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.bfloat16: "BFloat16",
    torch.float16: "Half",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.bool: "Bool",
    torch.uint8: "Byte",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _shape(t: Tensor) -> list:
    return list(t.shape)


def _check_4d(t: Tensor, op: str, name: str) -> None:
    torch._check(t.dim() == 4, lambda: f"{op}: expected {name} to be a 4-D (N, C, H, W) tensor, got shape {_shape(t)}")
    torch._check(
        t.is_floating_point(),
        lambda: f"{op}: expected {name} to be a floating-point tensor, got {_dtype_name(t.dtype)}",
    )


def _check_devices(op: str, main: str, first: Tensor, /, **others: Tensor | None) -> None:
    # The Meta key outranks CPU: a call mixing meta and CPU tensors lands in the fake impl, never in the kernels'
    # checks; a CUDA one without CUDA kernels lands in the fallback. Both check here, with the kernels' message.
    for name, t in others.items():
        if t is not None:
            torch._check(
                t.device == first.device,
                lambda: f"{op}: {main} is on {first.device} but {name} is on {t.device}; move both to the same device",
            )


def _check_same(op: str, na: str, a: Tensor, nb: str, b: Tensor) -> None:
    _check_devices(op, na, a, **{nb: b})
    torch._check(
        a.dtype == b.dtype,
        lambda: (
            f"{op}: {na} is {_dtype_name(a.dtype)} but {nb} is "
            f"{_dtype_name(b.dtype)}; use one dtype (or torch.autocast)"
        ),
    )


def _check_vector(op: str, name: str, v: Tensor, channels, like: Tensor) -> None:
    torch._check(
        v.dim() == 1 and v.shape[0] == channels,
        lambda: f"{op}: expected {name} of shape [{channels}] (one value per channel), got {_shape(v)}",
    )
    _check_devices(op, "the input", like, **{name: v})
    torch._check(
        v.is_floating_point(), lambda: f"{op}: expected {name} to be floating-point, got {_dtype_name(v.dtype)}"
    )


def _check_grad(op: str, name: str, grad: Tensor, like_name: str, like: Tensor, shape, note: str = "") -> None:
    """A gradient has the shape its forward produced, and the device and dtype of `like`."""
    torch._check(
        grad.dim() == len(shape) and all(a == b for a, b in zip(grad.shape, shape)),
        lambda: f"{op}: expected {name} of shape {list(shape)}{note}, got {_shape(grad)}",
    )
    _check_same(op, like_name, like, name, grad)


def _check_even(x: Tensor, op: str) -> None:
    torch._check(
        x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0,
        lambda: (
            f"{op}: 2x2 pooling needs an even height and width, got input of shape {_shape(x)}; pad or "
            "crop to even size (unetx.UNet pads its input for you)"
        ),
    )


def _check_mode(mode: str, op: str) -> int:
    torch._check(
        mode in ("none", "nearest", "bilinear"),
        lambda: f"{op}: upsampling mode must be 'none', 'nearest' or 'bilinear', got '{mode}'",
    )
    return 1 if mode == "none" else 2


def _pooled(t: Tensor) -> tuple:
    n, c, h, w = t.shape
    return n, c, h // 2, w // 2


# ------------------------------------------------------------------- fallback: devices with no kernel
# CUDA (until its kernels are verified on a GPU and enabled), MPS, XPU: each op runs as a composition of stock
# PyTorch ops with the same semantics (the references), so the package works everywhere. One warning per process.
_warned = False


def _cuda_hint(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    if BUILD_INFO["cuda"]:
        return "Set UNETX_CUDA_KERNELS=1 to use the compiled (not yet GPU-verified) CUDA kernels."
    return (
        "This unetx was built without CUDA kernels (no nvcc was found at build time); install the CUDA toolkit "
        "and reinstall unetx to compile them."
    )


def _warn_fallback(device: torch.device) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"unetx: no unetx kernels are enabled for {device.type}; running stock PyTorch compositions of the "
            "same ops (correct, but without the fused kernels' speed and memory savings). " + _cuda_hint(device),
            stacklevel=3,
        )

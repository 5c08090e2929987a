"""The CPU passes read nothing past the end of their inputs.

A channels-last pass reads each pixel's channels kSize at a time and then a partial chunk with masked loads (csrc/cpu/
vec.h); a load one element too long changes no output (the extra lane is never stored) but reads past the tensor,
which faults where the tensor ends at an unmapped page. Here every input of each standalone op ends exactly at a
PROT_NONE page (a worker process, so that a fault fails the test instead of the run), for every channel-count path of
tests/test_vector_tails.py, in float32, bfloat16 and float16, forward and backward; the outputs must equal the op's on
ordinary copies of the same inputs.
"""

from __future__ import annotations

import ctypes
import mmap
import subprocess
import sys

import pytest
import torch
from test_vector_tails import CHANNELS  # the channel counts that pick each vector path

DTYPES = ["float32", "bfloat16", "float16"]
_keep = []  # the mappings behind the guarded tensors (a tensor from torch.frombuffer does not own its memory)


def guarded(t: torch.Tensor) -> torch.Tensor:
    """A channels-last copy of t whose last byte is the last byte before a PROT_NONE page."""
    page = mmap.PAGESIZE
    nbytes = t.numel() * t.element_size()
    data = -(-nbytes // page) * page
    m = mmap.mmap(-1, data + page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mprotect(ctypes.c_void_p(base + data), ctypes.c_size_t(page), 0) != 0:  # PROT_NONE
        raise OSError(ctypes.get_errno(), "mprotect")
    _keep.append(m)
    flat = torch.frombuffer(m, dtype=t.dtype, count=t.numel(), offset=data - nbytes)
    n, c, h, w = t.shape
    out = flat.view(n, h, w, c).permute(0, 3, 1, 2)
    out.copy_(t)
    assert out.is_contiguous(memory_format=torch.channels_last)
    return out


def cases(c: int, dtype: torch.dtype):
    """(name, fn(make)) for each standalone op and its backward: make(t) gives an input tensor of t's values."""
    u = torch.ops.unetx
    g = torch.Generator().manual_seed(c)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)

    y, gy, gp = r(2, c, 6, 10), r(2, c, 6, 10), r(2, c, 3, 5)
    skip, low = r(2, c, 6, 10), r(2, c, 3, 5)
    gcat = r(2, 2 * c, 6, 10)
    scale, shift, mean = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g), torch.randn(c, generator=g)
    return [
        ("bn_relu", lambda m: u.bn_relu(m(y), scale, shift, mean)),
        ("bn_relu_backward", lambda m: u.bn_relu_backward(m(gy), m(y), scale, shift, mean)),
        ("bn_relu_pool", lambda m: u.bn_relu_pool(m(y), scale, shift, mean)),
        ("bn_relu_pool_backward", lambda m: u.bn_relu_pool_backward(m(gy), m(gp), m(y), scale, shift, mean)),
        ("avg_pool2x2", lambda m: u.avg_pool2x2(m(y))),
        ("avg_pool2x2_backward", lambda m: u.avg_pool2x2_backward(m(gp))),
        *[
            (f"upsample_concat {mode}", lambda m, mode=mode: u.upsample_concat(m(skip), m(low), mode))
            for mode in ("nearest", "bilinear")
        ],
        *[
            (f"upsample_concat_backward {mode}", lambda m, mode=mode: u.upsample_concat_backward(m(gcat), c, mode))
            for mode in ("nearest", "bilinear")
        ],
    ]


def worker(dtype_name: str) -> None:
    import unetx  # noqa: F401  (registers the ops)

    dtype = getattr(torch, dtype_name)
    for c in CHANNELS:
        for name, fn in cases(c, dtype):
            print(f"{name} C={c}", flush=True)  # the last line names the op of a fault
            got = fn(guarded)
            want = fn(lambda t: t.clone(memory_format=torch.channels_last))
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} C={c} {dtype_name}: guarded input")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mmap guard pages via mprotect: Linux")
@pytest.mark.parametrize("dtype", DTYPES)
def test_inputs_end_at_an_unmapped_page(dtype):
    p = subprocess.run([sys.executable, __file__, dtype], capture_output=True, text=True, timeout=600)
    last = (p.stdout.strip().splitlines() or ["(before the first op)"])[-1]
    fault = " (a read past the input's end)" if p.returncode < 0 else ""
    assert p.returncode == 0, f"{dtype}: worker exited {p.returncode} in {last}{fault}\n{p.stderr[-3000:]}"


if __name__ == "__main__":
    worker(sys.argv[1])

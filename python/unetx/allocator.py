"""The process's memory allocator, set once by the `unetx` commands (app/cli.py, bench/cli.py) before they train,
predict or measure: a process setting, below the layers, importing nothing of unetx.

glibc's malloc serves every block above its mmap threshold (which its own rule caps at 32 MiB) with a fresh mmap and
unmaps it when freed. A U-Net training step allocates and frees activation-sized tensors every step (CPU-S in
float32: 33.5 MiB each), so every step faults in every page of them again: a measurable share of a CPU training
step, for stock PyTorch and unetx alike (README, "Memory allocator"; BENCHMARKS.md, "Allocator"). Raising the mmap and
trim thresholds keeps freed blocks in the heap for the next step, which is what jemalloc or tcmalloc (the PyTorch
CPU performance guide's advice) give too. The cost: the process keeps its peak heap until it exits, which a training
or prediction run reaches in its first step anyway.

`import unetx` changes nothing: a library does not retune its host process's allocator. UNETX_MALLOC=system turns
it off for the commands too (to compare, or where another allocator is preloaded); UNETX_MALLOC=keep (or unset) is
the default; any other value is an error, so that a misspelt opt-out is not silently ignored.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
# Above every activation of a CPU run (a 1 GiB block is a 1024x1024 batch of 64 float32 channels x 4); larger
# ones still get their own mmap.
THRESHOLD = 1 << 30

_applied: bool | None = None


SETTINGS = ("keep", "system")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to THRESHOLD bytes, once per process. True where it took effect (Linux
    with glibc and no UNETX_MALLOC=system), False where it does not apply. ValueError for an UNETX_MALLOC that is
    not one of SETTINGS (before anything is changed)."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    setting = os.environ.get("UNETX_MALLOC", "").strip().lower() or "keep"
    if setting not in SETTINGS:
        raise ValueError(
            f"UNETX_MALLOC={os.environ['UNETX_MALLOC']!r} is not a setting: use UNETX_MALLOC=system for the system's "
            "malloc as configured, or leave it unset (keep freed blocks for the next step)"
        )
    if setting == "system":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # the mmap threshold first: setting either one also stops glibc's own threshold adjustment
    return bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, THRESHOLD))


def describe() -> str:
    """How this process allocates, for a benchmark's machine line."""
    if _applied:
        return f"glibc malloc, freed blocks kept below {THRESHOLD >> 20} MiB (unetx.allocator)"
    return "the system's malloc as configured"

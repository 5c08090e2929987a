"""Timing (interleaved rounds, medians) and memory (bytes saved for backward, peak allocation)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .cases import Case


def time_interleaved(
    fns: dict[str, Callable[[], None]],
    rounds: int,
    warmup: int | dict[str, int] = 1,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per call of each fn: `warmup` untimed calls each (an int, or one per name; the first call
    compiles), then `rounds` rounds
    that call every fn once, the order rotating each round so no fn always runs right after the same other.
    Returns (samples per name, seconds of each fn's first call)."""
    first: dict[str, float] = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
        for _ in range((warmup if isinstance(warmup, int) else warmup.get(name, 1)) - 1):
            fn()
        if log:
            log(f"  warm-up {name}: first call {first[name]:.2f} s")
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
        if log:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {samples[n][-1]:.3f}" for n in names))
    return samples, first


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of `reps` calls of fn after one warm-up call, in ms (bench/ scripts timing one kernel)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def saved_bytes(forward: Callable[[], torch.Tensor], parameters) -> tuple[int, int]:
    """(activation bytes, bytes including parameters) autograd saves for backward during one forward: the
    distinct storages handed to save_for_backward, each counted once however many views of it are saved."""
    params = {p.untyped_storage().data_ptr() for p in parameters}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = (st.nbytes(), st.data_ptr() in params)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    total = sum(n for n, _ in seen.values())
    return total - sum(n for n, is_param in seen.values() if is_param), total


def peak_allocated(case: Case) -> int:
    """Peak allocated CUDA memory during one step (parameters, optimizer state and activations)."""
    torch.cuda.synchronize(case.device)
    torch.cuda.reset_peak_memory_stats(case.device)
    case.step()
    return torch.cuda.max_memory_allocated(case.device)

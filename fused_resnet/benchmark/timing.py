"""Timing and memory measurement that is correct on GPUs.

CUDA work is asynchronous: a clock read right after a launch measures the launch, not the work.
:func:`synchronized_clock` waits for the device before reading ``time.perf_counter``, so a timer
around a round of calls (pytest-benchmark's ``pedantic`` calls its timer only there) measures the
work of that round, and :func:`median_seconds` does the same for the CLI. Peak memory comes from
``torch.cuda.max_memory_allocated`` on CUDA; on every device the bytes of activations autograd
saves for backward are counted with ``saved_tensors_hooks`` (what fusion saves is the other half
of "leaner").
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def synchronized_clock() -> float:
    """``time.perf_counter()`` read after all queued CUDA work has finished (pytest-benchmark timer)."""
    synchronize()
    return time.perf_counter()


def median_seconds(fn: Callable[[], object], *, rounds: int, iterations: int = 1, warmup: int = 1,
                   on_round: Callable[[], None] | None = None) -> tuple[float, list[float]]:
    """Median over ``rounds`` of the per-call time of ``iterations`` back-to-back calls of ``fn``,
    after ``warmup`` untimed rounds (compilation, autotuning, allocator growth); also every sample."""
    for _ in range(warmup):
        for _ in range(iterations):
            fn()
    samples = []
    for _ in range(rounds):
        start = synchronized_clock()
        for _ in range(iterations):
            fn()
        samples.append((synchronized_clock() - start) / iterations)
        if on_round is not None:
            on_round()
    return statistics.median(samples), samples


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory allocated while ``fn`` runs once (inputs, weights and outputs included);
    None off CUDA, where torch keeps no such counter."""
    if device.type != "cuda":
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    synchronize()
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return peak


def saved_activation_bytes(forward: Callable[[], object], exclude: list[torch.Tensor] = ()) -> int | None:
    """Bytes of the distinct tensors autograd saves for backward during ``forward()``, leaving out
    storages shared with ``exclude`` (parameters, the input) since those exist anyway. None when
    the forward cannot run under the hooks."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in excluded and ptr != 0:
                seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage (fakes, subclasses)
            pass
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
        del out
    except Exception:  # noqa: BLE001  (a variant the hooks cannot follow just has no number)
        return None
    return sum(seen.values())


def do_bench_median_ms(fn: Callable[[], object]) -> float | None:
    """``triton.testing.do_bench``'s median (ms; CUDA events, L2 flushed between calls), or None."""
    if not torch.cuda.is_available():
        return None
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measure_peaks(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Measured matrix-unit peak (FLOP/s of a large square matmul in ``dtype``) and copy bandwidth
    (bytes read + written per second by a large device-to-device copy): the roofline's two roofs."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    rounds = 10 if device.type == "cuda" else 3
    matmul, _ = median_seconds(lambda: a @ b, rounds=rounds, iterations=5 if device.type == "cuda" else 1, warmup=2)
    elements = (1 << 28) if device.type == "cuda" else (1 << 23)  # 1 GiB in fp32 on CUDA, 32 MiB on the CPU
    src = torch.empty(elements, device=device)
    dst = torch.empty_like(src)
    copy, _ = median_seconds(lambda: dst.copy_(src), rounds=rounds, iterations=5 if device.type == "cuda" else 1,
                             warmup=2)
    return {"matmul_flops_per_s": 2 * n**3 / matmul, "copy_bytes_per_s": 2 * src.nbytes / copy,
            "matmul_dtype": str(dtype).removeprefix("torch.")}

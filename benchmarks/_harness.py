"""One way to time any prepared case with pytest-benchmark and fill its ``extra_info``."""

from __future__ import annotations

import os

import torch

from fused_resnet.benchmark import timing

# (rounds, iterations per round, warm-up rounds) by device and kind: enough rounds for a stable
# median on an H100 within the suite's time, and few on the CPU where each call takes longer.
SCHEDULE = {
    ("cuda", "block"): (20, 5, 3), ("cuda", "kernel"): (20, 10, 3), ("cuda", "model"): (10, 2, 3),
    ("cpu", "block"): (5, 1, 1), ("cpu", "kernel"): (5, 1, 1), ("cpu", "model"): (3, 1, 1),
}


def run(benchmark, prepared, device: torch.device, kind: str, info: dict) -> None:
    rounds, iterations, warmup = SCHEDULE[(device.type, kind)]
    rounds = int(os.environ.get("FUSED_RESNET_BENCH_ROUNDS", rounds))
    benchmark.extra_info.update(kind=kind, device=device.type, **info)
    benchmark.pedantic(prepared.fn, rounds=rounds, iterations=iterations, warmup_rounds=warmup)
    median = benchmark.stats.stats.median
    benchmark.extra_info["images_per_s"] = prepared.images / median
    benchmark.extra_info["peak_memory_bytes"] = timing.peak_memory_bytes(prepared.fn, device)
    if prepared.saved_fn is not None:
        benchmark.extra_info["saved_activation_bytes"] = timing.saved_activation_bytes(prepared.saved_fn, prepared.exclude)
    if device.type == "cuda" and os.environ.get("FUSED_RESNET_BENCH_DO_BENCH", "1") != "0":
        benchmark.extra_info["do_bench_median_ms"] = timing.do_bench_median_ms(prepared.fn)

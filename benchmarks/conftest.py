"""Benchmark suite setup: the device, the timer and the machine information in the JSON.

Run with ``pytest benchmarks/ --benchmark-only --benchmark-json=out.json`` (a plain ``pytest benchmarks/``
skips the benchmarks: see ``pytest_configure``). ``FUSED_RESNET_BENCH_DEVICE``
picks the device (default: cuda when present).
"""

from __future__ import annotations

import os

import pytest
import torch

from fused_resnet.benchmark.cases import default_sizes
from fused_resnet.benchmark.machine import machine_info as machine_info_for


def bench_device() -> torch.device:
    name = os.environ.get("FUSED_RESNET_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Skip the benchmarks unless ``--benchmark-only`` is given, as ``--benchmark-skip`` would. Set here,
    before pytest-benchmark reads its options, rather than in pyproject's addopts, where it would make
    every pytest run (``pytest tests`` too) fail without the plugin."""
    if hasattr(config.option, "benchmark_skip") and not config.getoption("benchmark_only"):
        config.option.benchmark_skip = True


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the numbers depend on (fields listed in ``fused_resnet.benchmark.machine``)."""
    device = bench_device()
    machine_info.update(machine_info_for(device, default_sizes(device.type)))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each benchmark starts from a clean compiler cache (so no case hits dynamo's recompile limit
    and silently runs eager) and returns its memory."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

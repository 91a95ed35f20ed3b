"""Benchmark suite setup: the device, the timer and the machine information in the JSON.

Run with ``pytest benchmarks/ --benchmark-only --benchmark-json=out.json`` (plain ``pytest``
skips benchmarks: ``--benchmark-skip`` is in the default options). ``FUSED_RESNET_BENCH_DEVICE``
picks the device (default: cuda when present).
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

import fused_resnet
from fused_resnet.benchmark.cases import default_sizes, variants


def bench_device() -> torch.device:
    name = os.environ.get("FUSED_RESNET_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the numbers depend on: device, library versions, threads, backends, dtype."""
    device = bench_device()
    sizes = default_sizes(device.type)
    machine_info["device"] = device.type
    machine_info["torch"] = torch.__version__
    machine_info["fused_resnet"] = fused_resnet.__version__
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["python"] = platform.python_version()
    machine_info["torch_num_threads"] = torch.get_num_threads()
    machine_info["fused_backends"] = fused_resnet.backends(device.type)
    machine_info["variants"] = [v.name for v in variants(device.type)]
    machine_info["dtype"] = str(sizes.dtype).removeprefix("torch.")
    machine_info["batch"] = sizes.batch
    machine_info["image_size"] = sizes.image
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine_info["gpu_name"] = props.name
        machine_info["gpu_memory_bytes"] = props.total_memory
        machine_info["gpu_sm_count"] = props.multi_processor_count
        machine_info["gpu_capability"] = f"{props.major}.{props.minor}"
        machine_info["cuda"] = torch.version.cuda
        machine_info["cudnn"] = torch.backends.cudnn.version()
        machine_info["driver"] = _driver_version()


def _driver_version() -> str | None:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             check=False, capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


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

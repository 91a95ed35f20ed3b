"""Each fused kernel on its own, per block shape and fused backend, with its FLOPs and minimum
bytes in ``extra_info``; plus the measured roofs (matmul peak, copy bandwidth). The report turns
these into each kernel's fraction of its roofline floor."""

from __future__ import annotations

import pytest
from _harness import run
from conftest import bench_device

from fused_resnet.benchmark import timing
from fused_resnet.benchmark.cases import BLOCKS, default_sizes, variants
from fused_resnet.benchmark.kernels import KERNELS, cost, prepare_kernel

pytestmark = pytest.mark.benchmark(timer=timing.synchronized_clock)

FUSED = [v for v in variants(bench_device().type) if v.fused]
CPU_KERNEL_SHAPES = ("basic-l2.0-ds", "bottleneck-l2.0-ds")


def test_peaks(benchmark, device):
    """The two roofs, measured on this device in the benchmark dtype (kept in ``extra_info``)."""
    sizes = default_sizes(device.type)
    benchmark.group = "roofs"
    peaks = benchmark.pedantic(timing.measure_peaks, args=(device, sizes.dtype), rounds=1, iterations=1)
    benchmark.extra_info.update(kind="peaks", device=device.type, **peaks)


@pytest.mark.parametrize("variant", FUSED, ids=lambda v: v.name)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", BLOCKS, ids=lambda s: s.name)
def test_kernel(benchmark, device, shape, kernel, variant):
    if device.type == "cpu" and variant.backend == "reference":
        pytest.skip("the reference backend is plain PyTorch: its kernel roofline says nothing on the CPU")
    if device.type == "cpu" and shape.name not in CPU_KERNEL_SHAPES:
        pytest.skip(f"on the CPU only {', '.join(CPU_KERNEL_SHAPES)} are timed per kernel (the roofline is for GPUs)")
    sizes = default_sizes(device.type)
    prepared = prepare_kernel(kernel, shape, variant.backend, sizes, device)
    c = cost(kernel, shape, sizes)
    benchmark.group = f"kernel {shape.name} {kernel}"
    run(benchmark, prepared, device, "kernel",
        {"case": shape.name, "kernel": kernel, "variant": variant.name, "mode": "kernel", "flops": c.flops, "bytes": c.bytes,
             "batch": sizes.batch, "dtype": str(sizes.dtype).removeprefix("torch.")})

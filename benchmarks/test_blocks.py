"""One residual block of each ResNet stage shape, eval forward and training forward + backward,
for every variant side by side (``benchmark.group`` = case and mode)."""

from __future__ import annotations

import pytest
import torch
from _harness import run
from conftest import bench_device

from fused_resnet.benchmark import timing
from fused_resnet.benchmark.cases import BLOCKS, MODES, default_sizes, prepare_block, skip_reason, variants

pytestmark = pytest.mark.benchmark(timer=timing.synchronized_clock)

VARIANTS = variants(bench_device().type)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", BLOCKS, ids=lambda s: s.name)
def test_block(benchmark, device, shape, mode, variant):
    reason = skip_reason(variant, device.type, shape.name)
    if reason:
        pytest.skip(reason)
    sizes = default_sizes(device.type)
    prepared = prepare_block(shape, variant, mode, sizes, device)
    benchmark.group = f"block {shape.name} {mode}"
    run(benchmark, prepared, device, "block",
        {"case": shape.name, "mode": mode, "variant": variant.name, "batch": sizes.batch,
             "dtype": str(sizes.dtype).removeprefix("torch."), "input_size": sizes.block_size(shape)})
    del prepared
    if device.type == "cuda":
        torch.cuda.synchronize()

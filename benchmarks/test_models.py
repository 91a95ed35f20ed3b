"""Whole ResNet-18 and ResNet-50: inference, and a training step (forward, cross-entropy,
backward, SGD step), for every variant side by side."""

from __future__ import annotations

import pytest
from _harness import run
from conftest import bench_device

from fused_resnet.benchmark import timing
from fused_resnet.benchmark.cases import MODELS, MODES, default_sizes, prepare_model, skip_reason, variants

pytestmark = pytest.mark.benchmark(timer=timing.synchronized_clock)

VARIANTS = variants(bench_device().type)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_model(benchmark, device, name, mode, variant):
    reason = skip_reason(variant, device.type, name)
    if reason:
        pytest.skip(reason)
    sizes = default_sizes(device.type)
    prepared = prepare_model(name, variant, mode, sizes, device)
    benchmark.group = f"model {name} {mode}"
    run(benchmark, prepared, device, "model",
        {"case": name, "mode": mode, "variant": variant.name, "batch": sizes.batch,
             "dtype": str(sizes.dtype).removeprefix("torch."), "input_size": sizes.image})

"""``fuse`` on real torchvision models (random init, small inputs): ResNet-18, ResNet-50, ResNeXt-50.

torchvision does not import under every torch the tests run with (CI runs this file in an environment
with torch 2.14 + torchvision + timm). On the reference backend the fused model matches the unfused
one in fp64 to ~1e-10 (outputs, every gradient, running statistics; train and eval); on the native
backend fp32 is compared with an fp64 oracle (fused error within 3x eager fp32's own, ``_lifecycle``).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fused_resnet
from fused_resnet import _backend

from _lifecycle import Trio, init_bns

tv_models = pytest.importorskip("torchvision.models")

# name -> number of modules fuse swaps: every block plus the stem conv.
MODELS = {"resnet18": 8 + 1, "resnet50": 16 + 1, "resnext50_32x4d": 16 + 1}


def _make(name):
    return init_bns(getattr(tv_models, name)(weights=None, num_classes=10))


@pytest.mark.parametrize("name", list(MODELS))
def test_fuse_keeps_state_dict_and_swaps_every_block(name):
    plain = _make(name)
    keys = {k: (v.shape, v.dtype) for k, v in plain.state_dict().items()}
    tensors = dict(plain.state_dict(keep_vars=True))
    assert len(fused_resnet.find_fusable(plain)) == MODELS[name]
    fused_resnet.fuse(plain)
    assert {k: (v.shape, v.dtype) for k, v in plain.state_dict().items()} == keys
    assert all(v is tensors[k] for k, v in plain.state_dict(keep_vars=True).items())  # the same tensors
    assert fused_resnet.find_fusable(plain) == []
    blocks = [m for m in plain.modules() if isinstance(m, (fused_resnet.FusedBasicBlock, fused_resnet.FusedBottleneck))]
    assert len(blocks) == MODELS[name] - 1


@pytest.mark.parametrize("name", list(MODELS))
def test_fp64_reference_parity(name):
    """fp64 on the reference backend: the unfused twin is the oracle (errors ~1e-15, bar 1e-10)."""
    # fp64 convolutions are slow on the CPU (no oneDNN): 48x48 (stage 4 still sees 2x2 per image), one step.
    trio = Trio.build(lambda: _make(name), dtype=torch.float64, backend="reference")
    trio.step(torch.randn(2, 3, 48, 48, dtype=torch.float64), what="fp64 train step")
    trio.forward(torch.randn(2, 3, 48, 48, dtype=torch.float64), what="fp64 eval N=2")
    trio.forward(torch.randn(1, 3, 48, 48, dtype=torch.float64), grad_mode=torch.inference_mode, what="fp64 eval N=1")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_native_vs_fp64_oracle(name, layout):
    reason = _backend.unavailable_reason("native", "cpu")
    if reason is not None:
        pytest.skip(f"native backend unavailable: {reason}")
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    trio = Trio.build(lambda: _make(name), dtype=torch.float32, memory_format=fmt, backend="native")
    trio.step(torch.randn(2, 3, 64, 64, dtype=torch.float64), what="fp32 train step")
    trio.forward(torch.randn(2, 3, 64, 64, dtype=torch.float64), what="fp32 eval N=2")
    trio.forward(torch.randn(1, 3, 64, 64, dtype=torch.float64), grad_mode=torch.inference_mode, what="fp32 eval N=1")


def test_fused_deepcopy_leaves_the_original_alone():
    """The users' pattern: ``fuse(copy.deepcopy(model))`` keeps the torchvision model unfused."""
    plain = _make("resnet18")
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    assert len(fused_resnet.find_fusable(plain)) == MODELS["resnet18"]
    assert type(plain.layer1[0]) is tv_models.resnet.BasicBlock and type(plain.conv1) is torch.nn.Conv2d
    assert fused.conv1.weight is not plain.conv1.weight
    x = torch.randn(2, 3, 64, 64)
    plain.eval(), fused.eval()
    with torch.no_grad():
        assert torch.allclose(fused(x), plain(x), rtol=1e-4, atol=1e-4)

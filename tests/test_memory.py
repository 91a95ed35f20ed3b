"""The memory story: what a fused block keeps for backward, measured with saved-tensor hooks."""

import copy

import pytest
import torch
from torch import nn

import fused_resnet

from _tv_resnet import TVBasicBlock, TVBottleneck


def _saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return sum(storages.values())


@pytest.mark.parametrize("block, expected_ratio", [
    # eager keeps x, conv1 out, relu1 out, conv2 out, block out; fused keeps x, conv1 out, conv2 out
    (lambda: TVBasicBlock(16, 16), 3 / 5),
    # eager keeps x, y1, a1, y2, a2, y3, out; fused keeps x, y1, y2, y3
    (lambda: TVBottleneck(32, 8), None),
], ids=["basic", "bottleneck"])
def test_fused_block_saves_no_normalised_activations(block, expected_ratio):
    plain = block().train()
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    x = torch.randn(4, plain.conv1.in_channels, 16, 16, requires_grad=True)
    eager_bytes = _saved_activation_bytes(plain, x)
    fused_bytes = _saved_activation_bytes(fused, x)
    per_channel_slack = 4096  # mean/scale/shift vectors
    if expected_ratio is not None:
        assert fused_bytes <= expected_ratio * eager_bytes + per_channel_slack
    assert fused_bytes < 0.75 * eager_bytes, (fused_bytes, eager_bytes)

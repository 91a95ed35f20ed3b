"""Bad input gets a clear error of the class nn users know, never a crash or a wrong answer."""

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet import ops

from _cases import activation, per_channel


def _layer(cin=4, cout=6):
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)


def _call(x, conv, bn, **kw):
    return ops.conv_bn_relu(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                            bn.num_batches_tracked, padding=conv.padding, **kw)


def test_wrong_channel_count():
    conv, bn = _layer()
    with pytest.raises(RuntimeError, match="expects 4 input channels"):
        _call(activation((2, 5, 6, 6)), conv, bn)


def test_input_and_weight_dtypes_must_match():
    conv, bn = _layer()
    with pytest.raises(RuntimeError, match="should be the same"):
        _call(activation((2, 4, 6, 6), torch.float64), conv, bn)


def test_integer_input_rejected():
    conv, bn = _layer()
    with pytest.raises((TypeError, RuntimeError), match="dtype|type"):
        _call(torch.ones(2, 4, 6, 6, dtype=torch.int32), conv, bn)


def test_not_4d():
    conv, bn = _layer()
    with pytest.raises(RuntimeError, match="4-D"):
        _call(torch.randn(4, 6, 6), conv, bn)


def test_input_smaller_than_kernel():
    conv = nn.Conv2d(4, 6, 7, bias=False)
    bn = nn.BatchNorm2d(6)
    with pytest.raises(RuntimeError, match="smaller than"):
        _call(activation((2, 4, 3, 3)), conv, bn)


def test_residual_shape_mismatch():
    y = activation((2, 6, 5, 5))
    with pytest.raises(RuntimeError, match="downsample"):
        ops.add_relu(y, activation((2, 6, 3, 3)))


def test_per_channel_parameters_checked():
    y = activation((2, 6, 5, 5))
    with pytest.raises(RuntimeError, match=r"shape \(6,\)"):
        torch.ops.fused_resnet.bn_add_relu(y, per_channel(5, torch.float32), None, None, None, None, True)


def test_batch_of_one_value_per_channel_in_training_is_a_value_error():
    block = fused_resnet.FusedBasicBlock(4, 4).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        block(activation((1, 4, 1, 1)))
    block.eval()
    assert block(activation((1, 4, 1, 1))).shape == (1, 4, 1, 1)


def test_basic_block_rejects_what_torchvision_rejects():
    with pytest.raises(ValueError, match="groups=1 and base_width=64"):
        fused_resnet.FusedBasicBlock(4, 4, groups=2)
    with pytest.raises(NotImplementedError, match="Dilation > 1"):
        fused_resnet.FusedBasicBlock(4, 4, dilation=2)


def test_mixed_devices_rejected():
    x = activation((2, 4, 6, 6))
    w = torch.randn(6, 4, 3, 3, device="meta")
    with pytest.raises(RuntimeError, match="device|meta"):
        torch.ops.fused_resnet.conv_stats(x, None, None, False, w, [1, 1], [1, 1], [1, 1], 1)

"""The functional ops against nn.Conv2d + nn.BatchNorm2d + nn.ReLU, and the op-library triplet
(opcheck, float64 gradcheck, torch.compile) for every registered op."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from fused_resnet import ops
from fused_resnet._tolerances import assert_close

from _cases import CONV_SHAPES, LAYOUTS, activation, conv_case, per_channel

DTYPES = [torch.float64, torch.float32]


def _nn_layer(shape, dtype, momentum=0.1, affine=True, track=True):
    n, cin, h, w, cout, k, s, p = shape
    conv = nn.Conv2d(cin, cout, k, s, p, bias=False).to(dtype)
    bn = nn.BatchNorm2d(cout, momentum=momentum, affine=affine, track_running_stats=track).to(dtype)
    if affine:
        nn.init.uniform_(bn.weight, 0.5, 1.5), nn.init.uniform_(bn.bias, -0.5, 0.5)
    if track:
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    return conv, bn


def _fused_call(x, conv, bn, relu=True):
    return ops.conv_bn_relu(
        x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
        stride=conv.stride, padding=conv.padding, training=bn.training, momentum=bn.momentum, eps=bn.eps, relu=relu,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_conv_bn_relu_matches_nn(shape, layout, dtype, train):
    conv, bn = _nn_layer(shape, dtype)
    conv2, bn2 = _nn_layer(shape, dtype)
    conv2.load_state_dict(conv.state_dict()), bn2.load_state_dict(bn.state_dict())
    bn.train(train), bn2.train(train)
    x = activation(shape[:4], dtype, layout).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    expected = F.relu(bn(conv(x)))
    got = _fused_call(x2, conv2, bn2)
    assert got.is_contiguous(memory_format=LAYOUTS[layout])
    assert_close(got, expected)
    g = torch.randn_like(expected)
    expected.backward(g), got.backward(g)
    assert_close(x2.grad, x.grad, name="grad x")
    for p, q in zip(list(conv.parameters()) + list(bn.parameters()), list(conv2.parameters()) + list(bn2.parameters())):
        assert_close(q.grad, p.grad, name="grad param")
    for b, c in zip(bn.buffers(), bn2.buffers()):
        assert_close(c.double(), b.double(), dtype, name="buffer")


@pytest.mark.parametrize("momentum", [0.1, 0.5, None], ids=["m0.1", "m0.5", "cumulative"])
def test_running_stats_over_steps(momentum):
    shape = CONV_SHAPES[1]
    conv, bn = _nn_layer(shape, torch.float64, momentum=momentum)
    conv2, bn2 = _nn_layer(shape, torch.float64, momentum=momentum)
    conv2.load_state_dict(conv.state_dict()), bn2.load_state_dict(bn.state_dict())
    for _ in range(4):
        x = activation(shape[:4], torch.float64, offset=3.0)
        F.relu(bn(conv(x))), _fused_call(x, conv2, bn2)
    assert bn2.num_batches_tracked.item() == bn.num_batches_tracked.item() == 4
    assert_close(bn2.running_mean, bn.running_mean)
    assert_close(bn2.running_var, bn.running_var)


@pytest.mark.parametrize("affine, track", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_bn_options(affine, track, train):
    shape = CONV_SHAPES[0]
    conv, bn = _nn_layer(shape, torch.float64, affine=affine, track=track)
    bn.train(train)
    x = activation(shape[:4], torch.float64)
    assert_close(_fused_call(x, conv, bn, relu=False), bn(conv(x)))


def test_batch_of_one_eval_and_error_in_training():
    shape = (1, 4, 1, 1, 6, 1, 1, 0)
    conv, bn = _nn_layer(shape, torch.float64)
    x = activation(shape[:4], torch.float64)
    bn.eval()
    assert_close(_fused_call(x, conv, bn), F.relu(bn(conv(x))))
    bn.train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(conv(x))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _fused_call(x, conv, bn)


def test_add_relu_and_block_tail():
    y = activation((2, 5, 6, 7), torch.float64)
    r = activation((2, 5, 6, 7), torch.float64)
    assert_close(ops.add_relu(y, r), F.relu(y + r))
    s, t, rs, rt = (per_channel(5, torch.float64) for _ in range(4))
    deferred = ops.DeferredBN(y, s, t)
    expected = F.relu(y * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1) + r * rs.view(1, -1, 1, 1) + rt.view(1, -1, 1, 1))
    assert_close(ops.bn_add_relu(deferred, ops.DeferredBN(r, rs, rt)), expected)
    # Mixed dtypes promote as eager `a + b` would.
    assert ops.add_relu(y.float(), r).dtype == torch.float64


def test_conv_bias_act_matches_eager():
    x, _, _, _, w, stride, padding, _, _ = conv_case(CONV_SHAPES[1], torch.float64)
    bias = per_channel(w.shape[0], torch.float64)
    out = F.conv2d(x, w, None, stride, padding) + bias.view(1, -1, 1, 1)
    res = torch.randn_like(out)
    got = ops.conv_bias_act(x, w, bias, res, stride=stride, padding=padding, relu=True)
    assert_close(got, F.relu(out + res))


def test_fold_bn_matches_eval_bn():
    conv, bn = _nn_layer(CONV_SHAPES[0], torch.float64)
    bn.eval()
    w, b = ops.fold_bn(conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    x = activation(CONV_SHAPES[0][:4], torch.float64)
    assert_close(F.conv2d(x, w, b, conv.stride, conv.padding), bn(conv(x)))


def test_autocast_casts_conv_operands_like_conv2d():
    conv, bn = _nn_layer(CONV_SHAPES[0], torch.float32)
    x = activation(CONV_SHAPES[0][:4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.relu(bn(conv(x)))
        got = _fused_call(x, conv, bn)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert_close(got.float(), expected.float(), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_half_precision_within_twice_pytorch_error(dtype):
    """Against an fp64 oracle, the fused op errs no more than twice eager PyTorch in the same dtype."""
    shape = CONV_SHAPES[1]
    conv, bn = _nn_layer(shape, torch.float64)
    x = activation(shape[:4], torch.float64)
    oracle = F.relu(bn(conv(x)))
    conv_lp, bn_lp = _nn_layer(shape, dtype)
    conv_lp.load_state_dict(conv.state_dict()), bn_lp.load_state_dict(bn.state_dict())
    eager = F.relu(bn_lp(conv_lp(x.to(dtype))))
    conv_f, bn_f = _nn_layer(shape, dtype)
    conv_f.load_state_dict(conv.state_dict()), bn_f.load_state_dict(bn.state_dict())
    fused = _fused_call(x.to(dtype), conv_f, bn_f)
    eager_err = assert_close(eager, oracle, dtype, name="eager")
    assert_close(fused, oracle, dtype, tol=max(2 * eager_err, 1e-6), name="fused")

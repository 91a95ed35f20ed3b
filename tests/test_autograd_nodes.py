"""The ops' C++ autograd nodes (``csrc/autograd.cpp``) keep autograd's contracts: saved tensors
checked for in-place changes, freed after backward, statistics not differentiable, no node without
grad, gradients of a subset equal to those of the whole, an unreached output's gradient taken as
zeros, and clear errors for what they do not support (forward-mode AD)."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from _cases import CONV_SHAPES, conv_case, per_channel

pytest.importorskip("fused_resnet._C")
OPS = torch.ops.fused_resnet
CONV = ([1, 1], [1, 1], [1, 1], 1)


def _conv_bn_args():
    """conv_bn's arguments in fp64: the prologue, affine BN, randomised running statistics."""
    torch.manual_seed(0)
    x, scale, shift, relu, weight, *_ = conv_case(CONV_SHAPES[0], torch.float64)
    c = weight.shape[0]
    leaves = [t.requires_grad_() for t in (x, scale, shift, weight)]
    bn_w, bn_b = per_channel(c, torch.float64, positive=True).requires_grad_(), per_channel(c, torch.float64)
    bn_b.requires_grad_()
    stats = (per_channel(c, torch.float64), per_channel(c, torch.float64, positive=True), torch.tensor(3))
    args = (x, scale, shift, relu, weight, bn_w, bn_b, *stats, 0.1, 1e-5, *CONV)
    return args, leaves + [bn_w, bn_b]


def test_conv_bn_node_outputs_and_running_stats():
    args, _ = _conv_bn_args()
    running_mean, version = args[7], args[7]._version
    before = running_mean.clone()
    y, scale, shift, mean, var = OPS.conv_bn(*args)
    assert y.grad_fn is scale.grad_fn is shift.grad_fn and y.grad_fn.name() == "ConvBnBackward"
    assert not mean.requires_grad and not var.requires_grad and mean.grad_fn is None
    assert running_mean._version > version and not torch.equal(running_mean, before)
    assert int(args[9]) == 4
    with torch.no_grad():
        assert OPS.conv_bn(*args)[0].grad_fn is None


@pytest.mark.parametrize("modified", ["weight", "mean"])
def test_in_place_change_of_a_saved_tensor_is_caught(modified):
    args, leaves = _conv_bn_args()
    y, scale, shift, mean, _ = OPS.conv_bn(*args)
    with torch.no_grad():
        (args[4] if modified == "weight" else mean).add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y.sum() + scale.sum()).backward()


def test_relu_output_saved_by_conv_bias_act_is_checked():
    torch.manual_seed(1)
    x, _, _, _, w, *conv = conv_case(CONV_SHAPES[0], torch.float64, prologue=False)
    x.requires_grad_()
    out = OPS.conv_bias_act(x, w, None, None, *conv, True)
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    out = OPS.conv_bias_act(x, w, None, None, *conv, False)  # no ReLU: the output is not saved
    out.mul_(2).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_saved_tensors_freed_unless_retained():
    args, leaves = _conv_bn_args()
    y, scale, shift, _, _ = OPS.conv_bn(*args)
    loss = (y * scale.view(1, -1, 1, 1)).sum() + shift.sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(loss, leaves)


def test_gradients_of_a_subset_and_of_an_unreached_output():
    args, leaves = _conv_bn_args()
    y, scale, shift, _, _ = OPS.conv_bn(*args)
    loss = (y * y).sum() + (scale * shift).sum()
    full = torch.autograd.grad(loss, leaves, retain_graph=True)
    for i in (0, 4, 5):  # x, weight, the BN weight, each alone
        (alone,) = torch.autograd.grad(loss, [leaves[i]], retain_graph=True)
        torch.testing.assert_close(alone, full[i], rtol=1e-12, atol=1e-12)
    # Only scale reaches the loss: y's and shift's gradients arrive undefined, taken as zeros.
    y, scale, shift, _, _ = OPS.conv_bn(*args)
    only_scale = torch.autograd.grad(scale.sum(), leaves, allow_unused=True)
    y, scale, shift, _, _ = OPS.conv_bn(*args)
    with_zeros = torch.autograd.grad(scale.sum() + (y * 0).sum() + (shift * 0).sum(), leaves, allow_unused=True)
    for a, b in zip(only_scale, with_zeros):
        assert (a is None and b is None) or torch.allclose(a if a is not None else torch.zeros_like(b), b,
                                                           rtol=1e-12, atol=1e-12)
    assert any(a is not None and a.abs().sum() > 0 for a in only_scale)


def test_forward_mode_ad_is_refused():
    torch.manual_seed(2)
    x, _, _, _, w, *conv = conv_case(CONV_SHAPES[0], torch.float64, prologue=False)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(NotImplementedError, match="conv_bias_act has no forward-mode"):
            OPS.conv_bias_act(dual, w, None, None, *conv, True)

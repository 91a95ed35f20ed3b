"""The Triton implicit-GEMM backward convolutions (``conv_stats_backward``, ``conv_bias_act_backward``: dgrad
and wgrad) against the reference, every gradient mask, and kernels, strides and paddings beyond ResNet's."""

from __future__ import annotations

import pytest
import torch
from _conv_gemm_cases import (
    CONV_SHAPES,
    DEV,
    ONE,
    PROLOGUES,
    SHAPE_IDS,
    _act,
    _check_all,
    _conv_args,
    _one_config_on_gpu,  # noqa: F401  (autouse fixture)
    _poison,  # noqa: F401  (autouse fixture)
    _strict_fp32,  # noqa: F401  (autouse fixture)
    _vec,
)

from fused_resnet import reference
from fused_resnet.backends.triton import _conv_gemm as cg
from fused_resnet.backends.triton import _conv_gemm_backward as cgb
from fused_resnet.backends.triton import _conv_gemm_common as common
from fused_resnet.backends.triton import _conv_gemm_wgrad as cgw


def _stats_backward_args(shape, dtype, channels_last, prologue):
    x, weight, stride, padding = _conv_args(shape, dtype, channels_last)
    has_scale, has_shift, relu = PROLOGUES[prologue]
    scale = _vec(x.shape[1], positive=True) if has_scale else None
    shift = _vec(x.shape[1]) if has_shift else None
    y, mean, _ = reference.conv_stats(x, scale, shift, relu, weight, stride, padding, ONE, 1)
    # grad_y in the other layout: autograd does not promise the forward's.
    grad_y = _act(y.shape, dtype, not channels_last)
    c_out = weight.shape[0]
    return (grad_y, _vec(c_out), _vec(c_out), x, scale, shift, relu, weight, y, mean, stride, padding, ONE, 1)


STATS_MASKS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]


@pytest.mark.parametrize("shape", CONV_SHAPES[:4], ids=SHAPE_IDS[:4])
@pytest.mark.parametrize("dtype, channels_last, prologue",
                         [(torch.float32, True, "bn_relu"), (torch.float16, False, "bn_relu"),
                          (torch.float32, False, "none")])
def test_conv_stats_backward(shape, dtype, channels_last, prologue):
    args = _stats_backward_args(shape, dtype, channels_last, prologue)
    mask = (True, True, True)
    assert cgb.supports_conv_stats_backward(*args, mask)
    _check_all(cgb.conv_stats_backward(*args, mask), reference.conv_stats_backward(*args, mask), dtype,
               ("grad_x", "grad_scale", "grad_shift", "grad_w"))


@pytest.mark.parametrize("mask", STATS_MASKS[1:], ids=["x", "affine", "w"])
@pytest.mark.parametrize("prologue", ["bn_relu", "shift_relu", "scale"])
def test_conv_stats_backward_masks(mask, prologue):
    args = _stats_backward_args(CONV_SHAPES[2], torch.float32, True, prologue)
    _check_all(cgb.conv_stats_backward(*args, mask), reference.conv_stats_backward(*args, mask), torch.float32,
               ("grad_x", "grad_scale", "grad_shift", "grad_w"))


def test_conv_stats_backward_stem():
    args = _stats_backward_args(CONV_SHAPES[4], torch.float32, True, "none")
    mask = (True, False, True)
    _check_all(cgb.conv_stats_backward(*args, mask), reference.conv_stats_backward(*args, mask), torch.float32,
               ("grad_x", "grad_scale", "grad_shift", "grad_w"))


def test_few_input_channels_flat_k():
    """3 input channels: (tap, channel) flattened into the forward's K and the wgrad's N, bias fused."""
    x, weight, stride, padding = _conv_args((3, 1, 1, 3, 10, 6, 5, 2), torch.float16, True)
    args = (x, weight, _vec(10), None, stride, padding, ONE, 1, True)
    assert common.flat_k(3, weight)
    out = cg.conv_bias_act(*args)
    _check_all((out,), (reference.conv_bias_act(*args),), torch.float16, ("out",))
    bwd = (_act(out.shape, torch.float16, True), x, weight, out, True, stride, padding, ONE, 1, (True, True, True, False))
    _check_all(cgb.conv_bias_act_backward(*bwd), reference.conv_bias_act_backward(*bwd), torch.float16,
               ("grad_x", "grad_w", "grad_bias", "grad_residual"))


def test_wgrad_split_and_tiny_phase():
    """Many pixels per output channel: the wgrad reduction is split over programs. Stride 3 on a width
    of 2 leaves the phase w % 3 == 2 empty."""
    args = _stats_backward_args((1, 1, 0, 6, 10, 12, 12, 2), torch.float32, False, "bn_relu")
    assert cgw._wgrad_split(288, 10, 6, 1, torch.device(DEV)) < 288 or DEV == "cuda"
    _check_all(cgb.conv_stats_backward(*args, (True, True, True)),
               reference.conv_stats_backward(*args, (True, True, True)), torch.float32,
               ("grad_x", "grad_scale", "grad_shift", "grad_w"))
    args = _stats_backward_args((3, 3, 1, 4, 6, 5, 2, 1), torch.float32, True, "bn_relu")
    _check_all(cgb.conv_stats_backward(*args, (True, True, True)),
               reference.conv_stats_backward(*args, (True, True, True)), torch.float32,
               ("grad_x", "grad_scale", "grad_shift", "grad_w"))


@pytest.mark.parametrize("kernel, stride, padding", [((3, 1), (2, 1), (1, 0)), ((5, 5), (3, 2), (2, 3)),
                                                     ((1, 3), (1, 3), (0, 2))], ids=["3x1", "5x5", "1x3"])
def test_rectangular_kernels_strides_paddings(kernel, stride, padding):
    """Beyond ResNet's convs: non-square kernels, strides and paddings (padding up to the kernel size)."""
    x = _act((2, 5, 8, 7), torch.float32, True)
    weight = torch.randn(9, 5, *kernel, device=DEV) * 0.2
    fwd = (x, _vec(5, True), _vec(5), True, weight, stride, padding, ONE, 1)
    _check_all(cg.conv_stats(*fwd), reference.conv_stats(*fwd), torch.float32, ("y", "mean", "var"))
    y, mean, _ = reference.conv_stats(*fwd)
    bwd = (_act(y.shape, torch.float32, False), _vec(9), _vec(9), *fwd[:5], y, mean, stride, padding, ONE, 1)
    mask = (True, True, True)
    _check_all(cgb.conv_stats_backward(*bwd, mask), reference.conv_stats_backward(*bwd, mask), torch.float32,
               ("grad_x", "grad_scale", "grad_shift", "grad_w"))


BIAS_MASKS = [(True, True, True, True), (True, True, True, False), (False, False, True, False),
              (True, False, False, True), (False, True, False, False)]


@pytest.mark.parametrize("mask", BIAS_MASKS, ids=["all", "no_res", "bias_only", "x_res", "w_only"])
@pytest.mark.parametrize("shape, dtype, channels_last, relu",
                         [(CONV_SHAPES[1], torch.float32, True, True), (CONV_SHAPES[2], torch.float16, False, True),
                          (CONV_SHAPES[3], torch.float32, False, False)], ids=["k3s1", "k3s2", "k1s2"])
def test_conv_bias_act_backward(mask, shape, dtype, channels_last, relu):
    x, weight, stride, padding = _conv_args(shape, dtype, channels_last)
    out = reference.conv_bias_act(x, weight, _vec(weight.shape[0]), None, stride, padding, ONE, 1, relu)
    grad_out = _act(out.shape, dtype, not channels_last)
    args = (grad_out, x, weight, out, relu, stride, padding, ONE, 1, mask)
    assert cgb.supports_conv_bias_act_backward(*args)
    _check_all(cgb.conv_bias_act_backward(*args), reference.conv_bias_act_backward(*args), dtype,
               ("grad_x", "grad_w", "grad_bias", "grad_residual"))

"""The Triton implicit-GEMM forward convolutions (``conv_stats``, ``conv_bias_act``) against the reference,
what the kernels decline, and 64-bit offsets in every activation they read."""

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

_EMPTY = torch.empty  # unpoisoned, for the lazily backed huge storages


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype, channels_last, prologue",
                         [(torch.float32, False, "bn_relu"), (torch.float16, True, "bn_relu"),
                          (torch.float32, True, "none")])
def test_conv_stats(shape, dtype, channels_last, prologue):
    x, weight, stride, padding = _conv_args(shape, dtype, channels_last)
    has_scale, has_shift, relu = PROLOGUES[prologue]
    scale = _vec(x.shape[1], positive=True) if has_scale else None
    shift = _vec(x.shape[1]) if has_shift else None
    args = (x, scale, shift, relu, weight, stride, padding, ONE, 1)
    assert cg.supports_conv_stats(*args)
    _check_all(cg.conv_stats(*args), reference.conv_stats(*args), dtype, ("y", "mean", "var"))


@pytest.mark.parametrize("prologue", ["shift_relu", "scale"])
def test_conv_stats_partial_prologue(prologue):
    x, weight, stride, padding = _conv_args(CONV_SHAPES[1], torch.float16, False)
    has_scale, has_shift, relu = PROLOGUES[prologue]
    args = (x, _vec(6, True) if has_scale else None, _vec(6) if has_shift else None, relu, weight, stride, padding,
            ONE, 1)
    _check_all(cg.conv_stats(*args), reference.conv_stats(*args), torch.float16, ("y", "mean", "var"))


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype, channels_last, bias, residual, relu",
                         [(torch.float32, True, True, True, True), (torch.float16, False, True, False, True),
                          (torch.float32, False, False, True, False)])
def test_conv_bias_act(shape, dtype, channels_last, bias, residual, relu):
    x, weight, stride, padding = _conv_args(shape, dtype, channels_last)
    out_shape = reference.conv_bias_act(x, weight, None, None, stride, padding, ONE, 1, False).shape
    b = _vec(weight.shape[0]) if bias else None
    # The residual's layout need not match the input's.
    r = _act(out_shape, dtype, not channels_last) if residual else None
    args = (x, weight, b, r, stride, padding, ONE, 1, relu)
    assert cg.supports_conv_bias_act(*args)
    _check_all((cg.conv_bias_act(*args),), (reference.conv_bias_act(*args),), dtype, ("out",))


def test_conv_bias_act_batch_of_one_fp16():
    x, weight, stride, padding = _conv_args((3, 1, 1, 7, 9, 5, 5, 1), torch.float16, True)
    args = (x, weight, _vec(9), _act((1, 9, 5, 5), torch.float16, True), stride, padding, ONE, 1, True)
    _check_all((cg.conv_bias_act(*args),), (reference.conv_bias_act(*args),), torch.float16, ("out",))


def test_small_tiles_many_programs():
    """A forced small config: several row, channel and K blocks per conv, and STATS_ROWS blocks per tile."""
    x, weight, stride, padding = _conv_args((3, 1, 1, 20, 40, 6, 5, 2), torch.float32, True)
    args = (x, _vec(20, True), _vec(20), True, weight, stride, padding, ONE, 1)
    with common.forced_config("fwd", common.make_config(32, 16, 16, 4, 1, GROUP_M=2)):
        got = cg.conv_stats(*args)
    _check_all(got, reference.conv_stats(*args), torch.float32, ("y", "mean", "var"))


# ---- what the kernels decline, and 64-bit offsets -------------------------------------------------------


def test_supports_declines_what_the_reference_must_do():
    x, weight, stride, padding = _conv_args(CONV_SHAPES[1], torch.float32, False)
    assert cg.supports_conv(x, weight, stride, padding, ONE, 1)
    assert not cg.supports_conv(x, weight, stride, padding, (2, 2), 1)
    assert not cg.supports_conv(x[:, :4], weight[:, :2], stride, padding, ONE, 2)
    assert not cg.supports_conv(x.double(), weight.double(), stride, padding, ONE, 1)
    if DEV == "cpu":  # the interpreter's bf16 tl.dot is wrong
        assert not cg.supports_conv(x.bfloat16(), weight.bfloat16(), stride, padding, ONE, 1)


def _huge_stride_view(shape, dtype, huge_dim):
    """A ``shape`` view whose ``huge_dim`` index times its stride passes 2**31 elements; the other
    dims are laid out channels_last below it. The storage is reserved (virtual memory) but only the
    touched pages are ever backed by memory."""
    strides = [0] * 4
    extent = 1
    for d in (1, 3, 2, 0):
        if d != huge_dim:
            strides[d] = extent
            extent *= shape[d]
    strides[huge_dim] = max(2**31 // (shape[huge_dim] - 1) + 1, extent)
    storage = _EMPTY((shape[huge_dim] - 1) * strides[huge_dim] + extent, dtype=dtype, device=DEV)
    view = storage.as_strided(shape, strides)
    view.copy_(torch.randn(shape, device=DEV))
    return view


def test_int64_offsets():
    """Offsets past 2**31 elements in every activation the kernels read (inputs, residual, gradient)."""
    x = _huge_stride_view((2, 3, 5, 4), torch.float16, huge_dim=2)
    weight = torch.randn(6, 3, 3, 3, device=DEV).half()
    residual = _huge_stride_view((2, 6, 5, 4), torch.float16, huge_dim=1)
    args = (x, weight, _vec(6), residual, ONE, ONE, ONE, 1, True)
    _check_all((cg.conv_bias_act(*args),), (reference.conv_bias_act(*args),), torch.float16, ("out",))
    args = (x, _vec(3, True), _vec(3), True, weight, ONE, ONE, ONE, 1)
    _check_all(cg.conv_stats(*args), reference.conv_stats(*args), torch.float16, ("y", "mean", "var"))
    out = reference.conv_bias_act(x, weight, None, None, ONE, ONE, ONE, 1, True)
    grad_out = _huge_stride_view(tuple(out.shape), torch.float16, huge_dim=0)
    args = (grad_out, x, weight, out, True, ONE, ONE, ONE, 1, (True, True, True, False))
    _check_all(cgb.conv_bias_act_backward(*args), reference.conv_bias_act_backward(*args), torch.float16,
               ("grad_x", "grad_w", "grad_bias", "grad_residual"))

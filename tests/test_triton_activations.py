"""The Triton kernels with ReLU6, SiLU, Hardswish and LeakyReLU 0.01 / 0.1 (``backends/triton/_act.py``; ReLU
and none are covered by the other Triton tests): the elementwise pass and its backward, the implicit-GEMM conv's prologue, epilogue
and backward, and the cuDNN-conv path's, each against the reference. Without a GPU they run under
Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``), in fp32 and fp16."""

from __future__ import annotations

import pytest
import torch
from _conv_gemm_cases import (
    CONV_SHAPES,
    ONE,
    _act,
    _check_all,
    _conv_args,
    _one_config_on_gpu,  # noqa: F401  (autouse fixture)
    _poison,  # noqa: F401  (autouse fixture)
    _strict_fp32,  # noqa: F401  (autouse fixture)
    _vec,
)

from fused_resnet import _activation, reference
from fused_resnet.backends.triton import _conv_gemm as cg
from fused_resnet.backends.triton import _conv_gemm_backward as cgb
from fused_resnet.backends.triton import _conv_torch, _elementwise

ACTS = {"relu6": _activation.RELU6, "silu": _activation.SILU, "hardswish": _activation.HARDSWISH,
        "leaky_relu": _activation.LEAKY_RELU, "leaky_relu_0.1": _activation.LEAKY_RELU_0_1}
CASES = [(torch.float32, False), (torch.float16, True)]
CASE_IDS = ["fp32_nchw", "fp16_nhwc"]


def _spread(t):
    return t * 4  # pre-activations on both sides of 0, of ReLU6's 6 and of Hardswish's -3 and 3


@pytest.mark.parametrize("dtype, channels_last", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("act", ACTS)
def test_elementwise_forward_and_backward(act, dtype, channels_last):
    """The one-pass BN + residual + activation and its backward (gradients and per-channel sums)."""
    code = ACTS[act]
    y = _spread(_act((2, 67, 5, 7), dtype, channels_last))
    r = _act((2, 67, 5, 7), dtype, channels_last)
    s, t, rs, rt = _vec(67, True), _vec(67), _vec(67), _vec(67)
    args = (y, s, t, r, rs, rt, code)
    _check_all((_elementwise.bn_add_relu(*args),), (reference.bn_add_relu(*args),), dtype, ("out",))
    bargs = (_act(y.shape, dtype, channels_last), *args, [True] * 4)
    gy, gs, gt, gr, grs, grt, _ = reference.bn_add_relu_backward(*bargs)  # no gate: its gradient None
    got = _elementwise.bn_add_relu_backward(*bargs[:8], need_dres=True, sum_dz=True, sum_dzy=True, sum_dzr=True)
    _check_all(got, (gy, gr, gt, gs, grs), dtype, ("grad_y", "grad_res", "sum_dz", "sum_dzy", "sum_dzr"))


@pytest.mark.parametrize("dtype, channels_last", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("act", ACTS)
def test_conv_gemm_prologue_forward_and_backward(act, dtype, channels_last):
    code = ACTS[act]
    x, weight, stride, padding = _conv_args(CONV_SHAPES[1], dtype, channels_last)
    x = _spread(x)
    args = (x, _vec(x.shape[1], positive=True), _vec(x.shape[1]), code, weight, stride, padding, ONE, 1)
    _check_all(cg.conv_stats(*args), reference.conv_stats(*args), dtype, ("y", "mean", "var"))
    y, mean, _ = reference.conv_stats(*args)
    c_out = weight.shape[0]
    bargs = (_act(y.shape, dtype, not channels_last), _vec(c_out), _vec(c_out), *args[:4], weight, y, mean,
             stride, padding, ONE, 1, [True, True, True])
    _check_all(cgb.conv_stats_backward(*bargs), reference.conv_stats_backward(*bargs), dtype,
               ("grad_x", "grad_scale", "grad_shift", "grad_w"))
    _check_all(_conv_torch.conv_stats_backward(*bargs), reference.conv_stats_backward(*bargs), dtype,
               ("grad_x", "grad_scale", "grad_shift", "grad_w"))


@pytest.mark.parametrize("dtype, channels_last", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("act", ACTS)
def test_conv_gemm_epilogue_forward_and_backward(act, dtype, channels_last):
    """conv_bias_act with the activation in the epilogue; its backward given the pre-activation (what
    the op's autograd recomputes for SiLU and Hardswish) and, for ReLU6 and LeakyReLU, given the output
    (what the op's autograd saves for them: the same mask), against the reference's at the pre-activation."""
    code = ACTS[act]
    x, weight, stride, padding = _conv_args(CONV_SHAPES[2], dtype, channels_last)
    bias = _spread(_vec(weight.shape[0]))
    out_shape = reference.conv_bias_act(x, weight, None, None, stride, padding, ONE, 1, 0).shape
    res = _act(out_shape, dtype, channels_last)
    args = (x, weight, bias, res, stride, padding, ONE, 1, code)
    want = reference.conv_bias_act(*args)
    _check_all((cg.conv_bias_act(*args),), (want,), dtype, ("out",))
    _check_all((_conv_torch.conv_bias_act(*args),), (want,), dtype, ("out",))
    z = reference.conv_bias_act(*args[:-1], _activation.NONE)
    saved = [z] if code in _activation.NEEDS_PREACTIVATION else [z, want]
    for mask in ([True, True, True, True], [True, True, True, False]):
        grad = _act(out_shape, dtype, not channels_last)
        bargs = (grad, x, weight, z, code, stride, padding, ONE, 1, mask)
        names = ("grad_x", "grad_w", "grad_bias", "grad_residual")
        expected = reference.conv_bias_act_backward(*bargs)
        for out in saved:
            bargs = (grad, x, weight, out, code, stride, padding, ONE, 1, mask)
            _check_all(cgb.conv_bias_act_backward(*bargs), expected, dtype, names)
            _check_all(_conv_torch.conv_bias_act_backward(*bargs), expected, dtype, names)

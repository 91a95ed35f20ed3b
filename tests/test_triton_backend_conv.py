"""The ``triton`` backend's convolution kernels (conv_stats, conv_bias_act, forward and backward) against
the reference: layouts, dtypes, groups and dilation, determinism, opcheck, bf16 and CUDA graphs on a GPU."""

from __future__ import annotations

import pytest
import torch
from _triton_cases import (
    CONVS,
    DEVICES,
    DTYPES,
    LAYOUTS,
    _act,
    _compare,
    _conv_args,
    _poison,  # noqa: F401  (autouse fixture)
    _run,
    _vec,
    ops,
)

import fused_resnet
from fused_resnet import reference
from fused_resnet._tolerances import assert_close


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CONVS)
def test_conv_stats(case, dtype, layout, device):
    prologue = case != "1x1s2"
    args = _conv_args(case, dtype, layout, device, prologue=prologue)
    _compare(_run("conv_stats", *args), reference.conv_stats(*args), dtype, ("y", "mean", "var"))

    y, mean, _ = reference.conv_stats(*args)
    grads = (torch.randn_like(y), _vec(y.shape[1], device), _vec(y.shape[1], device))
    x, scale, shift, in_relu, weight, *conv = args
    for mask in ([True, True, True], [False, True, False], [True, False, True]):
        bargs = (*grads, x, scale, shift, in_relu, weight, y, mean, *conv, mask)
        _compare(_run("conv_stats_backward", *bargs), reference.conv_stats_backward(*bargs), dtype,
                 ("grad_x", "grad_scale", "grad_shift", "grad_w"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_stats_scale_only_prologue_and_mixed_layout_grad(layout, device):
    """A prologue without shift or ReLU, and an incoming gradient in the other layout."""
    x, scale, _, _, weight, *conv = _conv_args("3x3s1_odd", torch.float32, layout, device)
    args = (x, scale, None, False, weight, *conv)
    _compare(_run("conv_stats", *args), reference.conv_stats(*args), torch.float32, ("y", "mean", "var"))
    y, mean, _ = reference.conv_stats(*args)
    other = "nchw" if layout == "nhwc" else "nhwc"
    grad_y = torch.randn_like(y).contiguous(memory_format=LAYOUTS[other])
    bargs = (grad_y, _vec(y.shape[1], device), _vec(y.shape[1], device), x, scale, None, False, weight, y, mean,
             *conv, [True, True, True])
    _compare(_run("conv_stats_backward", *bargs), reference.conv_stats_backward(*bargs), torch.float32,
             ("grad_x", "grad_scale", "grad_shift", "grad_w"))


@pytest.mark.parametrize("device", DEVICES)
def test_conv_stats_groups_dilation(device):
    """Grouped, dilated convs (ResNeXt, dilated ResNets) go through torch's conv unchanged."""
    x = _act((2, 8, 9, 9), torch.float32, "nhwc", device)
    weight = torch.randn(12, 4, 3, 3, device=device) / 6.0
    args = (x, _vec(8, device, True), _vec(8, device), True, weight, [1, 1], [2, 2], [2, 2], 2)
    _compare(_run("conv_stats", *args), reference.conv_stats(*args), torch.float32, ("y", "mean", "var"))
    y, mean, _ = reference.conv_stats(*args)
    bargs = (torch.randn_like(y), _vec(12, device), _vec(12, device), *args[:5], y, mean, *args[5:], [True] * 3)
    _compare(_run("conv_stats_backward", *bargs), reference.conv_stats_backward(*bargs), torch.float32,
             ("grad_x", "grad_scale", "grad_shift", "grad_w"))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_repeat(device):
    """No atomics anywhere: the same call twice gives the same bits (also in deterministic mode)."""
    args = _conv_args("3x3s1_odd", torch.float32, "nhwc", device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _run("conv_stats", *args), _run("conv_stats", *args)
        y, mean, _ = first
        tail = (y, mean, mean, y, None, None, True)
        grads = [_run("bn_add_relu_backward", torch.ones_like(y), *tail, [True] * 4) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first + grads[0], second + grads[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_on_triton(device):
    """The ops' fakes agree with what the Triton kernels return; no output aliases an input."""
    args = _conv_args("3x3s2", torch.float32, "nhwc", device)
    y, mean, _ = reference.conv_stats(*args)
    tail = (y, _vec(12, device, True), _vec(12, device), torch.randn_like(y), None, None, True)
    x, _, _, _, weight, *conv = args
    with fused_resnet.use_backend("triton"):
        torch.library.opcheck(ops.conv_stats, args, test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(ops.bn_add_relu, tail, test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(ops.conv_bias_act, (x, weight, _vec(12, device), None, *conv, True),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_stats_large_mean(layout, device):
    """|mean| / std = 1e4: the statistics must keep the variance's digits (no E[y^2] - E[y]^2)."""
    n, c, h, w = 2, 7, 47, 49  # N*H*W = 4606 rows: more than one row chunk under the interpreter
    x = _act((n, c, h, w), torch.float32, layout, device) * 1e-3 + 10.0
    weight = torch.eye(c, device=device).view(c, c, 1, 1) * 100.0  # y = 100 * x: mean 1e3, std 0.1
    args = (x, None, None, False, weight, [1, 1], [0, 0], [1, 1], 1)
    y, mean, var = _run("conv_stats", *args)
    var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    assert_close(mean, mean64, torch.float32, name="mean")
    assert_close(var, var64, torch.float32, name="var")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["bias_res_relu", "bias_relu", "plain", "res_norelu"])
def test_conv_bias_act(variant, dtype, layout, device):
    x, _, _, _, weight, *conv = _conv_args("3x3s1_odd" if variant != "plain" else "3x3s2", dtype, layout, device)
    x = x[:1].contiguous(memory_format=LAYOUTS[layout])  # N=1: the eval-mode case
    out_shape = reference.conv_bias_act(x, weight, None, None, *conv, False).shape
    bias = _vec(weight.shape[0], device) if "bias" in variant else None
    residual = _act(out_shape, dtype, layout, device) if "res" in variant else None
    relu = "norelu" not in variant and variant != "plain"
    args = (x, weight, bias, residual, *conv, relu)
    _compare(_run("conv_bias_act", *args), (reference.conv_bias_act(*args),), dtype, ("out",))
    out = reference.conv_bias_act(*args)
    for mask in ([True, True, True, True], [False, True, bias is not None, False], [True, False, False, True]):
        bargs = (torch.randn_like(out), x, weight, out, relu, *conv, mask)
        _compare(_run("conv_bias_act_backward", *bargs), reference.conv_bias_act_backward(*bargs), dtype,
                 ("grad_x", "grad_w", "grad_bias", "grad_res"))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CONVS)
def test_bf16_cuda(case, layout):
    args = _conv_args(case, torch.bfloat16, layout, "cuda")
    _compare(_run("conv_stats", *args), reference.conv_stats(*args), torch.bfloat16, ("y", "mean", "var"))
    y, mean, _ = reference.conv_stats(*args)
    bargs = (torch.randn_like(y), _vec(y.shape[1], "cuda"), _vec(y.shape[1], "cuda"), *args[:5], y, mean, *args[5:],
             [True, True, True])
    _compare(_run("conv_stats_backward", *bargs), reference.conv_stats_backward(*bargs), torch.bfloat16,
             ("grad_x", "grad_scale", "grad_shift", "grad_w"))
    tail = (y, _vec(y.shape[1], "cuda", True), _vec(y.shape[1], "cuda"), torch.randn_like(y), None, None, True)
    _compare(_run("bn_add_relu", *tail), (reference.bn_add_relu(*tail),), torch.bfloat16, ("out",))


@pytest.mark.cuda
def test_cuda_graph_capture():
    """No host syncs, no data-dependent allocations: a training step's kernels replay in a graph."""
    args = _conv_args("3x3s1_odd", torch.float16, "nhwc", "cuda")
    with fused_resnet.use_backend("triton"):
        ops.conv_stats(*args)  # tune and decide outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, mean, var = ops.conv_stats(*args)
    graph.replay()
    torch.cuda.synchronize()
    _compare((y, mean, var), reference.conv_stats(*args), torch.float16, ("y", "mean", "var"))

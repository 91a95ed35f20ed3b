"""The native kernels (the public ops on the native backend) against fused_resnet.reference, on fresh
random inputs, forward and backward, for every dtype, layout and shape class they claim."""

from __future__ import annotations

import pytest
import torch
from _native_helpers import (
    DTYPES,
    LAYOUTS,
    act,
    device_params,
    layout_of,
    native_kernels,
    per_channel,
    poison_outputs,  # noqa: F401  (autouse fixture)
    require_native,
    skip_unless_native,
)

from fused_resnet import reference
from fused_resnet._tolerances import assert_close

require_native()
ops = native_kernels

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups): odd sizes, channels that are
# not a multiple of any vector width, stride 2, 1x1, grouped and dilated convolutions, N = 1.
CONVS = [
    (2, 24, 9, 7, 40, 3, 1, 1, 1, 1),
    (3, 16, 8, 8, 20, 3, 2, 1, 1, 1),
    (1, 5, 11, 6, 7, 1, 1, 0, 1, 1),
    (2, 32, 6, 5, 64, 1, 2, 0, 1, 1),
    (2, 12, 7, 7, 12, 3, 1, 2, 2, 3),
    # 1x1 strided, channels_last: the backward as matrix products on every s-th pixel (csrc/fused_ops.cpp);
    # sizes that stride 3 does not divide, and the shape whose oneDNN backward corrupts memory.
    (2, 5, 10, 11, 7, 1, 3, 0, 1, 1),
    (3, 8, 10, 10, 4, 1, 2, 0, 1, 1),
]
# (N, C, H, W) for the elementwise/reduction ops; includes 1x1 spatial and long planes.
SHAPES = [(2, 24, 9, 7), (1, 3, 5, 5), (4, 64, 4, 4), (2, 17, 1, 1), (2, 8, 33, 35)]


def _check(actual, expected, dtype, name):
    if expected is None:
        assert actual is None, f"{name}: expected no gradient"
        return
    assert actual is not None, f"{name}: missing"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    if actual.dim() == 4 and "weight" not in name:
        assert layout_of(actual) == layout_of(expected), f"{name}: layout differs from the reference"
    assert_close(actual, expected, dtype, name=name)


def _conv_case(case, dtype, layout, device):
    n, cin, h, w, cout, k, stride, padding, dilation, groups = case
    x = act((n, cin, h, w), dtype, layout, device)
    weight = (torch.randn(cout, cin // groups, k, k, device=device) / (cin // groups * k * k) ** 0.5).to(dtype)
    return x, weight, [stride] * 2, [padding] * 2, [dilation] * 2, groups


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("prologue", ["none", "affine_relu", "scale_only", "relu_only"])
def test_conv_stats(case, dtype, layout, prologue, device):
    skip_unless_native(device)
    _check_conv_stats(*_conv_case(case, dtype, layout, device), prologue, dtype)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [CONVS[0], CONVS[2], CONVS[3]])
@pytest.mark.parametrize("prologue", ["none", "affine_relu"])
def test_conv_stats_channel_prefix(case, dtype, layout, prologue, device):
    """The input a channel prefix of a wider tensor (a DenseNet layer's slice of its block's feature
    buffer): NCHW kernels read it in place with its batch stride, forward and backward."""
    skip_unless_native(device)
    x, *conv = _conv_case(case, dtype, layout, device)
    wide = act((x.shape[0], x.shape[1] + 5, *x.shape[2:]), dtype, layout, device)
    _check_conv_stats(wide[:, :x.shape[1]], *conv, prologue, dtype)


def _check_conv_stats(x, weight, stride, padding, dilation, groups, prologue, dtype):
    """conv_stats and conv_stats_backward (three output masks) vs the reference."""
    device = x.device
    cin = x.shape[1]
    in_scale = per_channel(cin, device, around=1.0) if prologue in ("affine_relu", "scale_only") else None
    in_shift = per_channel(cin, device) if prologue == "affine_relu" else None
    in_relu = prologue in ("affine_relu", "relu_only")
    args = (x, in_scale, in_shift, in_relu, weight, stride, padding, dilation, groups)
    got, want = ops.conv_stats(*args), reference.conv_stats(*args)
    for g, e, name in zip(got, want, ("y", "mean", "var")):
        _check(g, e, dtype, name)

    grad_y = act(want[0].shape, dtype, layout_of(want[0]), device)
    grad_mean, grad_var = torch.randn_like(want[1]), torch.randn_like(want[2])
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        bargs = (grad_y, grad_mean, grad_var, x, in_scale, in_shift, in_relu, weight, want[0], want[1],
                 stride, padding, dilation, groups, mask)
        got_b, want_b = ops.conv_stats_backward(*bargs), reference.conv_stats_backward(*bargs)
        for g, e, name in zip(got_b, want_b, ("grad_x", "grad_in_scale", "grad_in_shift", "grad_weight")):
            _check(g, e, dtype, f"{name} (mask {mask})")


def _bn_inputs(shape, dtype, layout, device, variant):
    y = act(shape, dtype, layout, device)
    c = shape[1]
    scale, shift = per_channel(c, device, around=1.0), per_channel(c, device)
    residual = res_scale = res_shift = None
    if variant in ("residual", "downsample"):
        residual = act(shape, dtype, layout, device)
    if variant == "downsample":
        res_scale, res_shift = per_channel(c, device, around=1.0), per_channel(c, device)
    if variant == "add_only":
        scale = shift = None
        residual = act(shape, dtype, layout, device)
    return y, scale, shift, residual, res_scale, res_shift


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["bn", "residual", "downsample", "add_only"])
@pytest.mark.parametrize("relu", [True, False])
def test_bn_add_relu(shape, dtype, layout, variant, relu, device):
    skip_unless_native(device)
    inputs = _bn_inputs(shape, dtype, layout, device, variant)
    _check(ops.bn_add_relu(*inputs, relu), reference.bn_add_relu(*inputs, relu), dtype, "out")

    grad = act(shape, dtype, layout, device)
    for mask in ([True, True, True, True], [True, False, False, False], [False, True, False, True]):
        got = ops.bn_add_relu_backward(grad, *inputs, relu, mask)
        want = reference.bn_add_relu_backward(grad, *inputs, relu, mask)
        names = ("grad_y", "grad_scale", "grad_shift", "grad_residual", "grad_res_scale", "grad_res_shift")
        for g, e, name in zip(got, want, names):
            _check(g, e, dtype, f"{name} (mask {mask})")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("epilogue", ["bias_res_relu", "bias_relu", "none", "res"])
@pytest.mark.parametrize("grad_mode", ["enabled", "no_grad", "inference_mode"])
def test_conv_bias_act(case, dtype, layout, epilogue, grad_mode, device):
    """The kernel with and without autograd (it keeps no state between calls: the oneDNN serving
    path is an explicit preparation, test_native_onednn.py)."""
    skip_unless_native(device)
    x, weight, stride, padding, dilation, groups = _conv_case(case, dtype, layout, device)
    cout = weight.shape[0]
    out_shape = reference.conv_bias_act(x, weight, None, None, stride, padding, dilation, groups, False).shape
    bias = per_channel(cout, device) if "bias" in epilogue else None
    residual = act(out_shape, dtype, layout, device) if "res" in epilogue else None
    relu = "relu" in epilogue
    args = (x, weight, bias, residual, stride, padding, dilation, groups, relu)
    want = reference.conv_bias_act(*args)
    if grad_mode != "enabled":
        with torch.no_grad() if grad_mode == "no_grad" else torch.inference_mode():
            for _ in range(2):  # nothing from the first call may change the second
                _check(ops.conv_bias_act(*args), want, dtype, "out")
        return
    _check(ops.conv_bias_act(*args), want, dtype, "out")

    grad = act(out_shape, dtype, layout, device)
    for mask in ([True, True, True, True], [True, False, False, False], [False, True, True, False]):
        bargs = (grad, x, weight, want, relu, stride, padding, dilation, groups, mask)
        got_b, want_b = ops.conv_bias_act_backward(*bargs), reference.conv_bias_act_backward(*bargs)
        for g, e, name in zip(got_b, want_b, ("grad_x", "grad_weight", "grad_bias", "grad_residual")):
            _check(g, e, dtype, f"{name} (mask {mask})")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONVS[:4])
@pytest.mark.parametrize("variant", ["prologue_running_affine", "plain", "half_bn_params"])
def test_conv_bn(case, dtype, layout, variant, device):
    """The one-op conv+BN (conv_stats, running-statistics update, finalize) and its one backward
    against the reference's composition; half_bn_params: a .half() BN's fp16 weight/bias/buffers."""
    skip_unless_native(device)
    x, weight, stride, padding, dilation, groups = _conv_case(case, dtype, layout, device)
    cin, cout = x.shape[1], weight.shape[0]
    prologue = variant == "prologue_running_affine"
    in_scale, in_shift = (per_channel(cin, device, around=1.0), per_channel(cin, device)) if prologue else (None, None)
    pdt = torch.float16 if variant == "half_bn_params" else torch.float32
    gamma = per_channel(cout, device, around=1.0).to(pdt) if variant != "plain" else None
    beta = per_channel(cout, device).to(pdt) if variant != "plain" else None
    buffers = [per_channel(cout, device).to(pdt), (torch.rand(cout, device=device) + 0.5).to(pdt),
               torch.tensor(2, device=device)] if variant != "plain" else [None] * 3
    ref_buffers = [None if b is None else b.clone() for b in buffers]
    momentum = None if variant == "half_bn_params" else 0.1
    tail = (momentum, 1e-5, stride, padding, dilation, groups)
    got = ops.conv_bn(x, in_scale, in_shift, prologue, weight, gamma, beta, *buffers, *tail)
    want = reference.conv_bn(x, in_scale, in_shift, prologue, weight, gamma, beta, *ref_buffers, *tail)
    for g, e, name in zip(got, want, ("y", "scale", "shift", "mean", "var")):
        _check(g, e, dtype, name)
    for g, e, name in zip(buffers, ref_buffers, ("running_mean", "running_var", "num_batches_tracked")):
        if e is not None and name == "num_batches_tracked":
            assert torch.equal(g, e), name
        elif e is not None:
            assert_close(g, e, pdt, name=name)

    y, mean, var = want[0], want[3], want[4]
    grads = (act(y.shape, dtype, layout_of(y), device), torch.randn_like(mean), torch.randn_like(mean))
    for mask in ([True, True, True, True], [True, False, False, False], [False, True, True, True]):
        bargs = (*grads, x, in_scale, in_shift, prologue, weight, gamma, y, mean, var, 1e-5, stride, padding,
                 dilation, groups, mask)
        got_b, want_b = ops.conv_bn_backward(*bargs), reference.conv_bn_backward(*bargs)
        names = ("grad_x", "grad_in_scale", "grad_in_shift", "grad_weight", "grad_bn_weight", "grad_bn_bias")
        for g, e, name in zip(got_b, want_b, names):
            _check(g, e, pdt if name == "grad_bn_weight" and pdt != torch.float32 else dtype, f"{name} (mask {mask})")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("momentum", [0.1, None])
def test_update_running_stats(momentum, device):
    skip_unless_native(device)
    c = 13
    mean, var = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    state = [torch.randn(c, device=device), torch.rand(c, device=device) + 0.5,
             torch.tensor(3, dtype=torch.long, device=device)]
    expected = [t.clone() for t in state]
    ops.update_running_stats_(*state, mean, var, 37, momentum)
    reference.update_running_stats_(*expected, mean, var, 37, momentum)
    assert_close(state[0], expected[0], torch.float32, name="running_mean")
    assert_close(state[1], expected[1], torch.float32, name="running_var")
    assert int(state[2]) == int(expected[2]) == 4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stats_large_offset(layout):
    """Batch statistics of values with a large common offset: the shifted sums must not lose the
    variance to cancellation (sum of squares minus squared sum would, in fp32)."""
    y = act((4, 16, 31, 29), torch.float32, layout, "cpu") + 1000.0
    weight = torch.eye(16).view(16, 16, 1, 1)
    args = (y, None, None, False, weight, [1, 1], [0, 0], [1, 1], 1)
    _, mean, var = ops.conv_stats(*args)
    _, mean_ref, var_ref = reference.conv_stats(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    assert_close(mean, mean_ref.float(), torch.float32, name="mean")
    assert_close(var, var_ref.float(), torch.float32, name="var")


def test_empty_batch_statistics_are_nan():
    x = torch.randn(0, 4, 5, 5)
    _, mean, var = ops.conv_stats(x, None, None, False, torch.randn(6, 4, 3, 3), [1, 1], [1, 1], [1, 1], 1)
    assert mean.shape == var.shape == (6,)
    assert torch.isnan(mean).all() and torch.isnan(var).all()

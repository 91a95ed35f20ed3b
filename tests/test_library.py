"""The op-library triplet for every registered op: opcheck, float64 gradcheck, torch.compile."""

import pytest
import torch

import fused_resnet
from fused_resnet import ops
from fused_resnet._library import SCHEMAS
from fused_resnet._tolerances import assert_close

from _cases import CONV_SHAPES, LAYOUTS, activation, conv_case, per_channel

OPS = torch.ops.fused_resnet


# Arguments that are buffers (written in place), never differentiated: conv_bn's running statistics.
_BUFFERS = {"conv_bn": (7, 8)}


def _grad(args, name=""):
    return tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 and i not in _BUFFERS.get(name, ()) else a for i, a in enumerate(args))


def _op_samples(dtype=torch.float64, layout="nchw"):
    """(op name, args) covering every op with and without its optional inputs."""
    samples = []
    for prologue in (True, False):
        args = conv_case(CONV_SHAPES[1], dtype, layout, prologue=prologue)
        samples.append(("conv_stats", args))
        y, mean, var = OPS.conv_stats(*args)
        grads = (torch.randn_like(y), torch.randn_like(mean), torch.randn_like(var))
        samples.append(("conv_stats_backward", (*grads, *args[:5], y, mean, *args[5:], [True, True, True])))
    y = activation((2, 6, 5, 7), dtype, layout)
    r = activation((2, 6, 5, 7), dtype, layout)
    s, t, rs, rt = (per_channel(6, dtype) for _ in range(4))
    for tail in ((y, s, t, r, rs, rt, True), (y, s, t, r, None, None, True), (y, s, t, None, None, None, False),
                 (y, None, None, r, None, None, True)):
        samples.append(("bn_add_relu", tail))
        samples.append(("bn_add_relu_backward", (torch.randn_like(y), *tail, [True, True, True, True])))
    # The per-(sample, channel) gate: (N, C, 1, 1) in the activation dtype, (N, C) in the statistics dtype.
    gate4 = torch.rand(2, 6, 1, 1, dtype=dtype) + 0.5
    gate2 = torch.rand(2, 6, dtype=s.dtype) + 0.5
    # ... with ReLU6 / SiLU (activation codes 2, 3) too.
    for tail in ((y, s, t, r, rs, rt, True, gate4), (y, None, t, None, None, None, False, gate2),
                 (y, s, t, r, None, None, 2, gate4), (y, s, t, r, rs, rt, 3, gate2)):
        samples.append(("bn_add_relu", tail))
        samples.append(("bn_add_relu_backward", (torch.randn_like(y), *tail[:7], [True, True, True, True], "",
                                                 tail[7])))
    # ... and one sample (batch-1 serving; a channels_last one stays channels_last).
    y1, r1 = activation((1, 6, 5, 7), dtype, layout), activation((1, 6, 5, 7), dtype, layout)
    tail = (y1, s, t, r1, rs, rt, True, torch.rand(1, 6, 1, 1, dtype=dtype) + 0.5)
    samples.append(("bn_add_relu", tail))
    samples.append(("bn_add_relu_backward", (torch.randn_like(y1), *tail[:7], [True, True, True, True], "", tail[7])))
    x, _, _, _, w, stride, padding, dilation, groups = conv_case(CONV_SHAPES[0], dtype, layout)
    bias = per_channel(w.shape[0], dtype)
    out_shape = OPS.conv_bias_act(x, w, None, None, stride, padding, dilation, groups, False).shape
    res = activation(out_shape, dtype, layout)
    for b, rr, relu in ((bias, res, True), (None, None, False), (bias, None, True)):
        fwd = (x, w, b, rr, stride, padding, dilation, groups, relu)
        samples.append(("conv_bias_act", fwd))
        out = OPS.conv_bias_act(*fwd)
        mask = [True, True, b is not None, rr is not None]
        samples.append(("conv_bias_act_backward",
                        (torch.randn_like(out), x, w, out, relu, stride, padding, dilation, groups, mask)))
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    for prologue, running in ((True, True), (False, False)):
        args = conv_case(CONV_SHAPES[1], dtype, layout, prologue=prologue)
        c = args[4].shape[0]
        gamma, beta = per_channel(c, dtype), per_channel(c, dtype)
        buffers = (torch.randn(c, dtype=sdt), torch.rand(c, dtype=sdt) + 0.5, torch.tensor(2)) if running else \
            (None, None, None)
        fwd = (*args[:5], gamma, beta, *buffers, None if running else 0.1, 1e-5, *args[5:])
        samples.append(("conv_bn", fwd))
        y, _, _, mean, var = OPS.conv_bn(*fwd)
        grads = (torch.randn_like(y), torch.randn_like(mean), torch.randn_like(mean))
        samples.append(("conv_bn_backward", (*grads, *args[:5], gamma, y, mean, var, 1e-5, *args[5:],
                                             [True, True, True, True])))
    mean, var = torch.randn(6, dtype=sdt), torch.rand(6, dtype=sdt) + 0.5
    for gamma, beta in ((per_channel(6, dtype), per_channel(6, dtype)), (None, None)):
        samples.append(("bn_finalize", (mean, var, gamma, beta, 1e-5)))
        samples.append(("bn_finalize_backward", (torch.randn_like(mean), torch.randn_like(mean), mean, var, gamma,
                                                 1e-5, [True, True, gamma is not None, True])))
    return samples


def test_every_schema_is_sampled():
    assert {name for name, _ in _op_samples()} | {"update_running_stats_"} == set(SCHEMAS)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("index", range(len(_op_samples())))
def test_opcheck(index, layout):
    name, args = _op_samples(torch.float32, layout)[index]
    if not name.endswith("backward"):
        args = _grad(args, name)
    torch.library.opcheck(getattr(OPS, name), args)


def test_opcheck_update_running_stats():
    c = 5
    args = (torch.randn(c), torch.rand(c) + 0.5, torch.tensor(3), torch.randn(c), torch.rand(c), 40, 0.1)
    torch.library.opcheck(OPS.update_running_stats_, args)
    torch.library.opcheck(OPS.update_running_stats_, args[:-1] + (None,))


@pytest.mark.parametrize("index", [i for i, (n, _) in enumerate(_op_samples()) if not n.endswith("backward")])
def test_gradcheck_float64(index):
    name, args = _op_samples(torch.float64)[index]
    args = _grad(args, name)

    def differentiable(a):
        return isinstance(a, torch.Tensor) and a.requires_grad

    def fn(*tensors):
        it = iter(tensors)
        full = [next(it) if differentiable(a) else a for a in args]
        out = getattr(OPS, name)(*full)
        return out[:3] if name == "conv_bn" else out  # its batch statistics are not differentiable

    inputs = [a for a in args if differentiable(a)]
    with fused_resnet.use_backend("reference"):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
def test_bn_finalize_matches_the_reference_forward_and_backward(affine):
    """The op (ATen composition in C++, its autograd) against the reference's formulas, in fp32
    against an fp64 oracle; the BN parameters in fp16 get their gradients in fp16."""
    from fused_resnet import reference

    mean, var = torch.randn(7) * 3, torch.rand(7) + 0.1
    gamma = (torch.rand(7) + 0.5).half().requires_grad_() if affine else None
    beta = torch.randn(7).half().requires_grad_() if affine else None
    inputs = [mean.requires_grad_(), var.requires_grad_()]
    scale, shift = OPS.bn_finalize(mean, var, gamma, beta, 1e-5)
    want = reference.bn_finalize(mean.double(), var.double(), None if gamma is None else gamma.double(),
                                 None if beta is None else beta.double(), 1e-5)
    assert_close(scale, want[0], torch.float32, name="scale")
    assert_close(shift, want[1], torch.float32, name="shift")
    gs, gb = torch.randn(7), torch.randn(7)
    (scale * gs + shift * gb).sum().backward()
    grads = reference.bn_finalize_backward(gs.double(), gb.double(), mean.double(), var.double(),
                                           None if gamma is None else gamma.double(), 1e-5, [True] * 4)
    for tensor, expected, name in zip(inputs + [gamma, beta], grads, ("mean", "var", "weight", "bias")):
        if tensor is None:
            continue
        assert tensor.grad.dtype == tensor.dtype, name
        assert_close(tensor.grad, expected, tensor.dtype, name=f"grad {name}")


def test_update_running_stats_matches_batchnorm():
    bn = torch.nn.BatchNorm2d(4, momentum=None).double()
    running = [b.clone() for b in bn.buffers()]
    for _ in range(3):
        y = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 2 + 1
        bn(y)
        var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
        OPS.update_running_stats_(*running, mean, var, 75, None)
    for got, want in zip(running, bn.buffers()):
        assert_close(got.double(), want.double())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_compile_fullgraph_no_graph_break(block, train):
    torch._dynamo.reset()
    if block == "basic":
        downsample = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, 2, bias=False), torch.nn.BatchNorm2d(16))
        module = fused_resnet.FusedBasicBlock(8, 16, 2, downsample)
    else:
        module = fused_resnet.FusedBottleneck(16, 4)
    module.train(train)
    x = activation((2, module.conv1.in_channels, 9, 9))
    eager_out = module(x)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert_close(out, eager_out if not train else module(x), name="compiled")
    out.sum().backward()
    assert module.conv1.weight.grad is not None

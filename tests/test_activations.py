"""Every op with every activation code (``fused_resnet._activation``: none, ReLU, ReLU6, SiLU, Hardswish,
LeakyReLU 0.01 and 0.1), forward and backward (through the ops' autograd, so the backward ops run too), in every dtype against an fp64
oracle and in both layouts; the fp64 reference against plain PyTorch modules; fp64 gradcheck; opcheck;
bad codes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_resnet
from fused_resnet import _activation, ops
from fused_resnet._tolerances import assert_close, relative_error

from _cases import LAYOUTS, activation, per_channel

OPS = torch.ops.fused_resnet
ACTS = {"none": _activation.NONE, "relu": _activation.RELU, "relu6": _activation.RELU6, "silu": _activation.SILU,
        "hardswish": _activation.HARDSWISH, "leaky_relu": _activation.LEAKY_RELU,
        "leaky_relu_0.1": _activation.LEAKY_RELU_0_1}
# The codes gradcheck and opcheck run with (ReLU and none: the ops' own tests).
_CHECKED = [_activation.RELU6, _activation.SILU, _activation.HARDSWISH, _activation.LEAKY_RELU,
            _activation.LEAKY_RELU_0_1]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
CONV = ([1, 1], [1, 1], [1, 1], 1)  # 3x3, stride 1, padding 1
_MODULES = {"none": torch.nn.Identity(), "relu": torch.nn.ReLU(), "relu6": torch.nn.ReLU6(), "silu": torch.nn.SiLU(),
            "hardswish": torch.nn.Hardswish(), "leaky_relu": torch.nn.LeakyReLU(),
            "leaky_relu_0.1": torch.nn.LeakyReLU(0.1)}


def _spread(t: torch.Tensor) -> torch.Tensor:
    # Values on both sides of 0, of ReLU6's 6 and of Hardswish's -3 and 3: pre-activations spread over
    # about [-9, 9].
    return t * 3


def _inputs(op: str, dtype, layout):
    """Differentiable inputs of ``op`` (in ``dtype``; per-channel vectors fp32, fp64 for fp64) and the
    function of them that calls the op with activation code ``act``."""
    x = _spread(activation((2, 5, 7, 6), dtype, layout))
    s, t = per_channel(5, dtype, positive=True), _spread(per_channel(5, dtype))
    w = torch.randn(6, 5, 3, 3, dtype=dtype) / 15 ** 0.5
    if op == "bn_add_relu":
        r = activation((2, 5, 7, 6), dtype, layout)
        rs, rt = per_channel(5, dtype), per_channel(5, dtype)
        return (x, s, t, r, rs, rt), lambda act, *a: OPS.bn_add_relu(*a, act)
    if op == "conv_bias_act":
        b = _spread(per_channel(6, dtype))
        r = activation((2, 6, 7, 6), dtype, layout)
        return (x, w, b, r), lambda act, x, w, b, r: OPS.conv_bias_act(x, w, b, r, *CONV, act)
    if op == "conv_stats":
        return (x, s, t, w), lambda act, x, s, t, w: OPS.conv_stats(x, s, t, act, w, *CONV)
    gamma, beta = per_channel(6, dtype, positive=True), per_channel(6, dtype)
    return (x, s, t, w, gamma, beta), lambda act, x, s, t, w, g, b: OPS.conv_bn(
        x, s, t, act, w, g, b, None, None, None, 0.1, 1e-5, *CONV)[:3]


def _forward_backward(fn, act, inputs, seed_grads=None):
    inputs = [a.detach().requires_grad_() for a in inputs]
    outs = fn(act, *inputs)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    if seed_grads is None:
        torch.manual_seed(1)
        seed_grads = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    loss = sum((o.double() * g).sum() for o, g in zip(outs, seed_grads))
    grads = torch.autograd.grad(loss, inputs)
    return outs, grads, seed_grads


def _oracle_inputs(inputs):
    return [a.double() for a in inputs]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("op", ["bn_add_relu", "conv_bias_act", "conv_stats", "conv_bn"])
def test_op_matches_fp64_oracle(op, act, dtype, layout):
    """Outputs and every input's gradient in ``dtype`` (native kernels for fp32/bf16/fp16, the reference
    for fp64) against the same op on fp64 copies of the inputs; outputs keep the input's layout."""
    torch.manual_seed(0)
    inputs, fn = _inputs(op, dtype, layout)
    outs, grads, seeds = _forward_backward(fn, ACTS[act], inputs)
    with fused_resnet.use_backend("reference"):
        want_outs, want_grads, _ = _forward_backward(fn, ACTS[act], _oracle_inputs(inputs), seeds)
    for i, (got, want) in enumerate(zip(outs, want_outs)):
        if got.dim() == 4:
            assert got.dtype == dtype and got.is_contiguous(memory_format=LAYOUTS[layout]), f"output {i}"
        assert_close(got, want, dtype, name=f"output {i}")
    for i, (got, want) in enumerate(zip(grads, want_grads)):
        assert got.dtype == inputs[i].dtype, f"grad {i}"
        assert_close(got, want, dtype, name=f"grad {i}")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("op", ["bn_add_relu", "conv_bias_act", "conv_stats", "conv_bn"])
def test_fp64_reference_matches_torch_modules(op, act):
    """fp64: the ops (reference backend) against the same computation written with ``nn.ReLU`` /
    ``nn.ReLU6`` / ``nn.SiLU`` / ``nn.Hardswish`` / ``nn.LeakyReLU`` and autograd, outputs and gradients within 1e-9 relative."""
    torch.manual_seed(0)
    inputs, fn = _inputs(op, torch.float64, "nchw")
    module = _MODULES[act]

    def eager(*a):
        if op == "bn_add_relu":
            y, s, t, r, rs, rt = a
            cv = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
            return module(y * cv(s) + cv(t) + (r * cv(rs) + cv(rt)))
        if op == "conv_bias_act":
            x, w, b, r = a
            return module(F.conv2d(x, w, b, 1, 1) + r)
        x, s, t, w = a[:4]
        y = F.conv2d(module(x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)), w, None, 1, 1)
        var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
        if op == "conv_stats":
            return y, mean, var
        scale = a[4] / torch.sqrt(var + 1e-5)
        return y, scale, a[5] - mean * scale

    outs, grads, seeds = _forward_backward(fn, ACTS[act], inputs)
    want_outs, want_grads, _ = _forward_backward(lambda _, *a: eager(*a), None, inputs, seeds)
    for got, want in zip(outs, want_outs):
        assert_close(got, want, tol=1e-9)
    for got, want in zip(grads, want_grads):
        assert_close(got, want, tol=1e-9)


@pytest.mark.parametrize("act", _CHECKED)
@pytest.mark.parametrize("op", ["bn_add_relu", "conv_bias_act", "conv_stats", "conv_bn"])
def test_gradcheck_float64(op, act):
    torch.manual_seed(0)
    inputs, fn = _inputs(op, torch.float64, "nchw")
    inputs = [a.detach().requires_grad_() for a in inputs]
    assert torch.autograd.gradcheck(lambda *a: fn(act, *a), inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _opcheck_samples():
    torch.manual_seed(0)
    samples = []
    for act in _CHECKED:
        x = activation((2, 5, 7, 6))
        s, t, w = per_channel(5, torch.float32, positive=True), per_channel(5, torch.float32), torch.randn(6, 5, 3, 3)
        y, mean, var = OPS.conv_stats(x, s, t, act, w, *CONV)
        samples += [
            ("conv_stats", (x, s, t, act, w, *CONV)),
            ("conv_stats_backward", (torch.randn_like(y), torch.randn_like(mean), torch.randn_like(var), x, s, t, act,
                                     w, y, mean, *CONV, [True, True, True])),
            ("conv_bn", (x, s, t, act, w, None, None, None, None, None, 0.1, 1e-5, *CONV)),
            ("bn_add_relu", (x, s, t, x.clone(), None, t, act)),
            ("bn_add_relu_backward", (torch.randn_like(x), x, s, t, x.clone(), None, t, act, [True] * 4)),
            ("conv_bias_act", (x, w, per_channel(6, torch.float32), None, *CONV, act)),
            ("conv_bias_act_backward", (torch.randn_like(y), x, w, y, act, *CONV, [True] * 4)),
        ]
    return samples


@pytest.mark.parametrize("index", range(len(_opcheck_samples())))
def test_opcheck(index):
    name, args = _opcheck_samples()[index]
    if not name.endswith("backward"):
        args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
    torch.library.opcheck(getattr(OPS, name), args)


@pytest.mark.parametrize("code", [-1, 7, 9])
def test_bad_activation_code_is_a_clear_error(code):
    x = activation((1, 3, 4, 4))
    with pytest.raises(ValueError, match="activation code"):
        OPS.bn_add_relu(x, None, None, None, None, None, code)
    with pytest.raises(ValueError, match="activation code"):
        OPS.conv_stats(x, None, None, code, torch.randn(2, 3, 1, 1), [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(ValueError, match="unknown activation"):
        ops.bn_add_relu(x, activation="gelu")


def test_functional_api_names_and_old_flags():
    """``activation=`` by name; the boolean ``relu=`` still means ReLU or none."""
    torch.manual_seed(0)
    x, r = activation((2, 4, 5, 5)) * 4, activation((2, 4, 5, 5))
    assert torch.equal(ops.bn_add_relu(x, r, activation="relu6"), F.relu6(x + r))
    assert_close(ops.bn_add_relu(x, r, activation="silu"), F.silu(x + r))
    assert_close(ops.bn_add_relu(x, r, activation="hardswish"), F.hardswish(x + r))
    assert torch.equal(ops.bn_add_relu(x, r, activation="leaky_relu"), F.leaky_relu(x + r))
    assert torch.equal(ops.bn_add_relu(x, r, activation="leaky_relu_0.1"), F.leaky_relu(x + r, 0.1))
    assert torch.equal(ops.bn_add_relu(x, r, relu=True), torch.relu(x + r))
    assert torch.equal(ops.bn_add_relu(x, r, relu=False), x + r)
    assert torch.equal(ops.bn_add_relu(x, r, activation=None), x + r)
    w = torch.randn(3, 4, 3, 3)
    for name, fn in (("relu6", F.relu6), ("silu", F.silu), ("hardswish", F.hardswish), ("leaky_relu", F.leaky_relu),
                     ("leaky_relu_0.1", lambda z: F.leaky_relu(z, 0.1))):
        assert_close(ops.conv_bias_act(x, w, padding=1, activation=name), fn(F.conv2d(x, w, padding=1)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_hardswish_kinks_take_atens_slopes(dtype):
    """Pre-activations exactly at Hardswish's kinks (-3, 3), just beside them, and NaN: the value and
    the derivative are ATen's (``hardswish_backward``: 0 at -3, 1 at 3), through bn_add_relu's
    kernels (native for fp32, the reference for fp64) and conv_bias_act's saved-input backward."""
    z = torch.tensor([-3.5, -3.0, -2.999, -1.5, 0.0, 2.999, 3.0, 3.5], dtype=dtype).view(1, 8, 1, 1)
    z = z.expand(2, 8, 3, 3).contiguous()
    g = torch.randn(z.shape, dtype=dtype)
    zr = z.clone().requires_grad_()
    want = F.hardswish(zr)
    want_grad, = torch.autograd.grad(want, zr, g)
    y = z.clone().requires_grad_()
    got = OPS.bn_add_relu(y, None, None, None, None, None, _activation.HARDSWISH)
    got_grad, = torch.autograd.grad(got, y, g)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    eye = torch.eye(8, dtype=dtype).view(8, 8, 1, 1)  # a 1x1 identity conv: its output is z exactly
    x = z.clone().requires_grad_()
    got = OPS.conv_bias_act(x, eye, None, None, [1, 1], [0, 0], [1, 1], 1, _activation.HARDSWISH)
    got_grad, = torch.autograd.grad(got, x, g)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    nan = torch.full((1, 1, 2, 2), float("nan"), dtype=dtype)
    assert OPS.bn_add_relu(nan, None, None, None, None, None, _activation.HARDSWISH).isnan().all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("act", [_activation.LEAKY_RELU, _activation.LEAKY_RELU_0_1])
def test_leaky_relu_kink_takes_atens_slope(act, dtype):
    """Pre-activations exactly at LeakyReLU's kink (0 and -0), just beside it, and NaN: the value and the
    derivative are ATen's (``leaky_relu_backward``: ``z > 0 ? g : g * slope``, the slope at 0 and for
    NaN), through bn_add_relu's kernels (native for fp32, the reference for fp64) and conv_bias_act,
    whose backward takes the mask from its saved output."""
    slope = _activation.SLOPES[act]
    z = torch.tensor([-2.0, -1e-30, -0.0, 0.0, 1e-30, 1.5, float("nan"), -0.5], dtype=dtype).view(1, 8, 1, 1)
    z = z.expand(2, 8, 3, 3).contiguous()
    g = torch.randn(z.shape, dtype=dtype)
    zr = z.clone().requires_grad_()
    want = F.leaky_relu(zr, slope)
    want_grad, = torch.autograd.grad(want, zr, g)
    y = z.clone().requires_grad_()
    got = OPS.bn_add_relu(y, None, None, None, None, None, act)
    got_grad, = torch.autograd.grad(got, y, g)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got_grad, want_grad)
    finite = z[:, :6].contiguous()  # a NaN would reach every channel through the conv's sums
    zr = finite.clone().requires_grad_()
    want = F.leaky_relu(zr, slope)
    want_grad, = torch.autograd.grad(want, zr, g[:, :6])
    eye = torch.eye(6, dtype=dtype).view(6, 6, 1, 1)  # a 1x1 identity conv: its output is z exactly
    x = finite.clone().requires_grad_()
    got = OPS.conv_bias_act(x, eye, None, None, [1, 1], [0, 0], [1, 1], 1, act)
    got_grad, = torch.autograd.grad(got, x, g[:, :6])
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


@pytest.mark.parametrize("act", [_activation.LEAKY_RELU, _activation.LEAKY_RELU_0_1, _activation.SILU])
def test_conv_bias_act_saves_the_output_for_leaky_relu(act):
    """LeakyReLU's mask comes from conv_bias_act's saved output (its positive slope keeps the sign), as
    ReLU's: an in-place change of the output before backward is caught. SiLU recomputes the
    pre-activation instead and keeps nothing the size of the output."""
    x, w = activation((2, 4, 5, 5)).requires_grad_(), torch.randn(3, 4, 3, 3, requires_grad=True)
    out = OPS.conv_bias_act(x, w, None, None, *CONV, act)
    out.mul_(2)
    if act == _activation.SILU:
        out.sum().backward()
        assert x.grad is not None and w.grad is not None
    else:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", [_activation.LEAKY_RELU, _activation.LEAKY_RELU_0_1])
@pytest.mark.parametrize("op", ["bn_add_relu", "conv_bias_act"])
def test_leaky_relu_within_eager_error(op, act, dtype, layout):
    """fp32 / bf16: the op's output and gradients no further from fp64 than ~3x what eager PyTorch
    (``nn.LeakyReLU`` after the same conv / affine + add, in that dtype) is from fp64."""
    torch.manual_seed(0)
    inputs, fn = _inputs(op, dtype, layout)
    module = torch.nn.LeakyReLU(_activation.SLOPES[act])

    def eager(*a):
        if op == "bn_add_relu":
            y, s, t, r, rs, rt = a
            s, t, rs, rt = (v.view(1, -1, 1, 1).to(y.dtype) for v in (s, t, rs, rt))
            return module(y * s + t + (r * rs + rt))
        x, w, b, r = a
        return module(F.conv2d(x, w, b.to(x.dtype), 1, 1) + r)

    outs, grads, seeds = _forward_backward(fn, act, inputs)
    eager_outs, eager_grads, _ = _forward_backward(lambda _, *a: eager(*a), None, inputs, seeds)
    gold_outs, gold_grads, _ = _forward_backward(lambda _, *a: eager(*a), None, _oracle_inputs(inputs), seeds)
    pairs = list(zip(outs + grads, eager_outs + eager_grads, gold_outs + gold_grads))
    for i, (got, ref, gold) in enumerate(pairs):
        err, eager_err = relative_error(got, gold), relative_error(ref, gold)
        # relative_error is inf with a NaN: NaN never passes.
        assert err <= 3 * eager_err + 1e-7, f"tensor {i}: {err:.3g} vs eager {eager_err:.3g}"

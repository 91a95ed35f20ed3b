"""``bn_add_relu``'s per-(sample, channel) gate (timm's SE, DropPath): values and every gradient
(the gate's included) against an fp64 oracle on each CPU backend, NCHW and channels_last, and clear
errors for a gate of the wrong shape, dtype or device. opcheck and fp64 gradcheck: test_library."""

from __future__ import annotations

import pytest
import torch

import fused_resnet
from fused_resnet import _activation, ops
from fused_resnet._tolerances import assert_close

from _cases import LAYOUTS, activation, per_channel

BACKENDS = [b for b in ("reference", "native") if b in fused_resnet.backends()]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _oracle(y, s, t, r, rs, rt, gate, act):
    """The unfused computation in fp64: act(gate * bn(y) + bn_r(r)) (act: an activation code)."""
    def v(a, default):
        return a.double().view(1, -1, 1, 1) if a is not None else default
    z = gate.double().reshape(y.shape[0], y.shape[1], 1, 1) * (y.double() * v(s, 1.0) + v(t, 0.0))
    if r is not None:
        z = z + r.double() * v(rs, 1.0) + v(rt, 0.0)
    return _activation.apply(z, act)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["downsample", "identity", "gate_only"])
@pytest.mark.parametrize("n", [3, 1])
def test_gate_forward_backward(n, case, dtype, layout, backend):
    """Several samples and one (batch-1 serving: a channels_last sample stays channels_last)."""
    _check_gated(case, dtype, layout, backend, "relu", n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("act", ["relu6", "silu"])
def test_gate_other_activations(act, dtype, layout, backend):
    """The gate with ReLU6 / SiLU (codes 2, 3): the activation applies to the gated sum."""
    _check_gated("downsample", dtype, layout, backend, act)


def _check_gated(case, dtype, layout, backend, act, n=3):
    c = 10
    y, r = activation((n, c, 5, 7), dtype, layout), activation((n, c, 5, 7), dtype, layout)
    if act == "relu6":  # values on both sides of 6 too
        y, r = y * 4, r * 4
    s, t, rs, rt = (per_channel(c, dtype) for _ in range(4))
    # (N, C, 1, 1) in the activation dtype, as SE gives it; (N, C) in the statistics dtype
    gate = (torch.rand(n, c, 1, 1, dtype=dtype) + 0.5) if case != "identity" else torch.rand(n, c, dtype=s.dtype)
    if n > 1:
        gate[0] = 0.0  # a dropped sample (DropPath)
    if case != "downsample":
        rs = rt = None
    inputs = [y, s, t, r, rs, rt, gate]
    leaves = [a.detach().clone().requires_grad_() if a is not None else None for a in inputs]
    with fused_resnet.use_backend(backend):
        y_, s_, t_, r_, rs_, rt_, g_ = leaves
        out = ops.bn_add_relu(ops.DeferredBN(y_, s_, t_), r_ if rs_ is None else ops.DeferredBN(r_, rs_, rt_),
                              activation=act, gate=g_)
    assert out.dtype == dtype and out.is_contiguous(memory_format=LAYOUTS[layout])
    gold = [a.detach().double().requires_grad_() if a is not None else None for a in inputs]
    want = _oracle(*gold[:6], gold[6], _activation.code(act))
    assert_close(out, want, dtype, name="out")
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad.double())
    for name, got, ref in zip(("y", "scale", "shift", "residual", "res_scale", "res_shift", "gate"), leaves, gold):
        if got is None:
            continue
        assert got.grad.dtype == got.dtype and got.grad.shape == got.shape, name
        assert_close(got.grad, ref.grad, dtype, name=f"grad {name}")


@pytest.mark.parametrize("act", [1, 2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [4, 1])
def test_gate_masks_native_matches_reference(n, layout, act):
    """The backward op with each output_mask: native (csrc/gate.cpp) against the reference."""
    if "native" not in fused_resnet.backends():
        pytest.skip("the native extension is not built for this torch")
    c = 6
    y, r, go = (activation((n, c, 3, 5), torch.float32, layout) for _ in range(3))
    s, t, rs, rt = (per_channel(c, torch.float32) for _ in range(4))
    gate = torch.rand(n, c, 1, 1) + 0.5
    for mask in ([True, True, True, True], [False, True, False, False], [True, False, True, True]):
        got = {}
        for backend in ("native", "reference"):
            with fused_resnet.use_backend(backend):
                got[backend] = torch.ops.fused_resnet.bn_add_relu_backward(go, y, s, t, r, rs, rt, act, mask, "",
                                                                           gate)
        for i, (a, b) in enumerate(zip(got["native"], got["reference"])):
            assert a.shape == b.shape, (mask, i)
            if i in (0, 3) and b.numel():  # the gradients of y and residual: laid out as y
                assert a.is_contiguous(memory_format=LAYOUTS[layout]), (mask, i)
            if b.numel():
                assert_close(a, b.to(a.dtype), torch.float32, name=f"{mask} output {i}")


@pytest.mark.parametrize("bad, message", [
    (torch.rand(3, 5), "gate must have shape"),
    (torch.rand(2, 5, 2, 1), "gate must have shape"),
    (torch.rand(5), "gate must have shape"),
    (torch.rand(2, 5, dtype=torch.float16), "gate must be"),
    (torch.rand(2, 5, dtype=torch.float64), "gate must be"),
    (torch.ones(2, 5, dtype=torch.int64), "gate must be"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_gate_errors(bad, message, backend):
    y = activation((2, 5, 3, 3))
    with fused_resnet.use_backend(backend), pytest.raises(RuntimeError, match=message):
        torch.ops.fused_resnet.bn_add_relu(y, None, None, None, None, None, True, bad)
    with pytest.raises(RuntimeError, match=message):  # the fake checks too (torch.compile, export)
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            torch.ops.fused_resnet.bn_add_relu(mode.from_tensor(y), None, None, None, None, None, True,
                                               mode.from_tensor(bad))


def test_functional_casts_a_foreign_gate():
    """ops.bn_add_relu casts a gate in neither the activation's nor the statistics dtype (fp64 for
    fp32 activations) to the statistics dtype; the op itself refuses it (above)."""
    y = activation((2, 5, 3, 3))
    gate = torch.rand(2, 5, 1, 1, dtype=torch.float64)
    assert_close(ops.bn_add_relu(y, relu=False, gate=gate), y.double() * gate, torch.float32)

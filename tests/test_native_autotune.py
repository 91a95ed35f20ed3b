"""``prepare_for_inference(model, autotune=True)`` on the native CPU backend: each prepared conv times
the routes that can take an input signature (oneDNN's prepacked conv, ATen's conv, a 1x1 conv as
one GEMM, the generic op) on its first call and keeps the fastest; results stay the reference's
whichever route wins."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from _native_helpers import act, require_native

import fused_resnet
from fused_resnet import fuse, models, reference
from fused_resnet._tolerances import assert_close

require_native()
from fused_resnet.backends.native import _onednn  # (needs the extension's backend)

F32 = torch.float32
CONV = ([1, 1], [1, 1], [1, 1], 1)  # stride, padding, dilation, groups

if _onednn._OPS is None:
    pytest.skip("this torch has no oneDNN convolution ops: the native CPU backend has no oneDNN path",
                allow_module_level=True)


def _conv(layout="nhwc"):
    x = act((2, 8, 7, 6), F32, layout, "cpu")
    w = torch.randn(12, 8, 3, 3) / 8
    if layout == "nhwc":
        w = w.contiguous(memory_format=torch.channels_last)
    residual = act((2, 12, 7, 6), F32, layout, "cpu")
    return x, w, torch.randn(12), residual


def _slowed(monkeypatch, slow: set):
    """Make the routes in ``slow`` ("onednn", "aten", None for the generic op) look slower to the
    autotuner: its clock (``_onednn.time``) is replaced by one that only the routes advance, by 1
    for a slow route and 0 for another, so that the choice does not depend on this machine's load.
    Returns the generic op's stand-in (the reference) for ``enable_autotune``."""
    now = [0.0]
    monkeypatch.setattr(_onednn, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    run = _onednn.PackedConv._run

    def timed_run(self, route, *args):
        now[0] += route in slow
        return run(self, route, *args)

    monkeypatch.setattr(_onednn.PackedConv, "_run", timed_run)

    def generic(x, residual, act_code):
        now[0] += None in slow
        return reference.conv_bias_act(x, generic.w, generic.b, residual, *generic.conv, act_code)

    generic.conv = CONV
    return generic


@pytest.mark.parametrize("fast", ["onednn", "aten", None], ids=["onednn", "aten", "generic"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_autotune_keeps_the_fastest_route(fast, layout, monkeypatch):
    x, w, b, _ = _conv(layout)
    generic = _slowed(monkeypatch, {"onednn", "aten", None} - {fast})
    generic.w, generic.b = w, b
    packed = _onednn.prepack_conv(w, b, *CONV)
    packed.enable_autotune(generic)
    with torch.no_grad():
        for _ in range(2):  # the second call takes the route the first one timed
            out = packed(x, None, 1)
    assert list(packed.routes.values()) == [fast]
    if fast is None:
        assert out is None  # the caller (PreparedConv) runs the generic op
    else:
        assert_close(out, reference.conv_bias_act(x, w, b, None, *CONV, 1), F32, name="out")


# ATen's conv is a candidate only without a residual (its epilogue cannot add one).
POINTWISE_CASES = [(fast, False) for fast in ("onednn", "aten", "gemm", None)] + [
    (fast, True) for fast in ("onednn", "gemm", None)]


@pytest.mark.parametrize("fast, with_residual", POINTWISE_CASES,
                         ids=lambda v: {None: "generic", True: "residual", False: "plain"}.get(v, v))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_autotune_times_the_gemm_route_of_a_pointwise_conv(fast, with_residual, layout, monkeypatch):
    """A 1x1 conv of stride 1 can also run as one matrix product: one more candidate."""
    x = act((2, 8, 7, 6), F32, layout, "cpu")
    w, b, conv = torch.randn(12, 8, 1, 1) / 3, torch.randn(12), ([1, 1], [0, 0], [1, 1], 1)
    residual = act((2, 12, 7, 6), F32, layout, "cpu") if with_residual else None
    generic = _slowed(monkeypatch, {"onednn", "aten", "gemm", None} - {fast})
    generic.w, generic.b, generic.conv = w, b, conv
    packed = _onednn.prepack_conv(w, b, *conv)
    packed.enable_autotune(generic)
    with torch.no_grad():
        for _ in range(2):
            out = packed(x, residual, 1)
    assert list(packed.routes.values()) == [fast]
    if fast is not None:
        assert_close(out, reference.conv_bias_act(x, w, b, residual, *conv, 1), F32, name="out")


@pytest.mark.parametrize("slow", ["onednn", "generic"])
def test_autotune_with_a_residual_never_takes_atens_conv(slow, monkeypatch):
    """ATen's conv cannot add a residual in its epilogue: only oneDNN and the op compete."""
    x, w, b, residual = _conv()
    generic = _slowed(monkeypatch, {"onednn" if slow == "onednn" else None})
    generic.w, generic.b = w, b
    packed = _onednn.prepack_conv(w, b, *CONV)
    packed.enable_autotune(generic)
    with torch.no_grad():
        out = packed(x, residual, 1)
    assert list(packed.routes.values()) == [None if slow == "onednn" else "onednn"]
    if out is not None:
        assert_close(out, reference.conv_bias_act(x, w, b, residual, *CONV, 1), F32, name="out")


def test_autotune_times_nothing_for_what_only_the_op_takes(monkeypatch):
    """A bfloat16 input: oneDNN's prepacked fp32 conv cannot take it, so there is nothing to time."""
    x, w, b, _ = _conv()
    packed = _onednn.prepack_conv(w, b, *CONV)
    packed.enable_autotune(lambda *args: pytest.fail("the generic op was timed"))
    with torch.no_grad():
        assert packed(x.bfloat16(), None, 1) is None
    assert list(packed.routes.values()) == [None]


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_autotuned_model_matches_eager_and_tunes_each_signature_once(layout, grad_mode, monkeypatch):
    torch.manual_seed(0)
    eager = models.resnet18(fused=False, num_classes=10).eval()
    with torch.no_grad():  # BN statistics away from the identity
        for m in eager.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    fused_model = fuse(copy.deepcopy(eager))
    if layout == "nhwc":
        eager, fused_model = (m.to(memory_format=torch.channels_last) for m in (eager, fused_model))
    fused_resnet.prepare_for_inference(fused_model, autotune=True)
    prepared = [p for m in fused_model.modules() for p in (m.__dict__.get("_prepared") or [])]
    assert prepared and all(p.packed.generic is not None for p in prepared)
    tuned = []
    tune = _onednn.PackedConv._tune
    monkeypatch.setattr(_onednn.PackedConv, "_tune", lambda self, *a: tuned.append(self) or tune(self, *a))
    x = act((2, 3, 32, 32), F32, layout, "cpu")
    with grad_mode():
        for _ in range(2):
            assert_close(fused_model(x), eager(x), F32, name="logits")
    assert len(tuned) == len(prepared)  # once per conv: the second forward reuses every choice
    assert all(len(p.packed.routes) == 1 for p in prepared)
    with torch.no_grad():  # the default stays the fixed rule: nothing timed
        fused_resnet.prepare_for_inference(fused_model)
        tuned.clear()
        fused_model(x)
    assert not tuned

"""The native CPU backend's serving path (backends/native/_onednn.py): a folded conv's weight
reordered for oneDNN once, by ``prepare_for_inference``, with the reference's results; it declines
what it was not prepared for; and a prepared model follows every change of its tensors."""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
from _native_helpers import act, require_native

import fused_resnet
from fused_resnet import _activation, fuse, models, reference
from fused_resnet._tolerances import assert_close
from fused_resnet.inference import PreparedConv

require_native()
from fused_resnet.backends.native import _onednn  # noqa: E402  (needs the extension's backend)

F32 = torch.float32

if _onednn._OPS is None:
    pytest.skip("this torch has no oneDNN convolution ops: the native CPU backend has no oneDNN path",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def every_conv_takes_the_path(monkeypatch):
    monkeypatch.setenv("FUSED_RESNET_ONEDNN_MIN_MACS", "0")  # tiny convs too (read at preparation)


def _geometry(case):
    return {"plain": ([1, 1], [1, 1], [1, 1], 1), "strided": ([2, 2], [1, 1], [1, 1], 1),
            "dilated": ([1, 1], [2, 2], [2, 2], 1), "grouped": ([1, 1], [1, 1], [1, 1], 4)}[case]


def _inputs(layout, case="plain"):
    stride, padding, dilation, groups = _geometry(case)
    x = act((2, 8, 7, 6), F32, layout, "cpu")  # NCHW: not much larger than the weight
    w = torch.randn(12, 8 // groups, 3, 3) / 8
    if layout == "nhwc":
        w = w.contiguous(memory_format=torch.channels_last)
    out_shape = reference.conv_bias_act(x, w, None, None, stride, padding, dilation, groups, False).shape
    return x, w, torch.randn(12), act(out_shape, F32, layout, "cpu"), (stride, padding, dilation, groups)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("case", ["plain", "strided", "dilated", "grouped"])
@pytest.mark.parametrize("epilogue", ["bias_res_relu", "bias_relu", "res", "none"])
@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_prepacked_conv_matches_the_reference(layout, case, epilogue, grad_mode):
    x, w, b, r, conv = _inputs(layout, case)
    bias = b if "bias" in epilogue else None
    residual = r if "res" in epilogue else None
    relu = "relu" in epilogue
    packed = _onednn.prepack_conv(w, bias, *conv)
    with grad_mode():
        for _ in range(2):  # the reorder is reused: nothing from the first call may change the second
            out = packed(x, residual, relu)
            assert out is not None
            assert_close(out, reference.conv_bias_act(x, w, bias, residual, *conv, relu), F32, name="out")
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("code", sorted(_activation.NAMES), ids=lambda c: str(_activation.NAMES[c]))
def test_prepacked_conv_applies_every_activation_code(layout, code):
    """Each activation code as oneDNN's post-op (ReLU6 ``hardtanh``, SiLU ``swish``, Hardswish
    ``hardswish``, LeakyReLU ``leaky_relu`` with its slope), the pre-activation straddling 0, 6 and
    Hardswish's kinks at -3 and 3; with a
    residual, the codes the binary op cannot take (it raises for them) are declined (the generic op)."""
    x, w, b, r, conv = _inputs(layout)
    x, r = x * 4, r * 4
    z = reference.conv_bias_act(x, w, b, r, *conv, _activation.NONE)
    assert (z < -3).any() and ((z > -3) & (z < 0)).any() and ((z > 3) & (z < 6)).any() and (z > 6).any()
    packed = _onednn.prepack_conv(w, b, *conv)
    with torch.no_grad():
        out = packed(x, None, code)
        assert_close(out, reference.conv_bias_act(x, w, b, None, *conv, code), F32, name="out")
        out = packed(x, r, code)
        if code in (_activation.NONE, _activation.RELU):
            assert_close(out, reference.conv_bias_act(x, w, b, r, *conv, code), F32, name="out, residual")
        else:
            assert out is None


@pytest.mark.parametrize("code", sorted(_activation.NAMES), ids=lambda c: str(_activation.NAMES[c]))
def test_small_conv_applies_every_activation_code_in_place(code, monkeypatch):
    """Below the oneDNN threshold: ATen's conv with the folded bias, then the activation in place on its
    output (``_activation.apply(inplace=True)``: ``leaky_relu_`` with the code's slope)."""
    monkeypatch.delenv("FUSED_RESNET_ONEDNN_MIN_MACS")
    x, w, b, _, conv = _inputs("nhwc")
    packed = _onednn.prepack_conv(w, b, *conv)
    with torch.no_grad():
        out = packed(x * 4, None, code)
    assert_close(out, reference.conv_bias_act(x * 4, w, b, None, *conv, code), F32, name="out")
    assert list(packed.routes.values()) == ["aten"] and not packed.packed


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("case", ["plain", "strided", "grouped"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_small_conv_runs_atens_conv_with_the_bias_inside(layout, case, relu, monkeypatch):
    """Below the oneDNN threshold and without a residual: ATen's conv with the folded bias, the ReLU in
    place; the reference's results in the input's layout, and no reorder made."""
    monkeypatch.delenv("FUSED_RESNET_ONEDNN_MIN_MACS")
    x, w, b, _, conv = _inputs(layout, case)
    packed = _onednn.prepack_conv(w, b, *conv)
    with torch.no_grad():
        for _ in range(2):  # the second call takes the route decided by the first
            out = packed(x, None, relu)
            assert_close(out, reference.conv_bias_act(x, w, b, None, *conv, relu), F32, name="out")
    assert list(packed.routes.values()) == ["aten"] and not packed.packed
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)


@pytest.mark.parametrize("case", ["grad_enabled", "other_layout", "bfloat16", "onednn_disabled", "small_conv",
                                  "nchw_input_much_larger_than_weight"])
def test_prepacked_conv_declines_what_it_was_not_prepared_for(case, monkeypatch):
    x, w, b, r, conv = _inputs("nhwc")
    if case == "small_conv":  # ~0.1 M multiply-adds: oneDNN's per-call setup would cost more than it saves
        monkeypatch.delenv("FUSED_RESNET_ONEDNN_MIN_MACS")
    if case == "nchw_input_much_larger_than_weight":
        w, x = w.contiguous(), act((2, 8, 32, 32), F32, "nchw", "cpu")
    packed = _onednn.prepack_conv(w, b, *conv)
    if case == "onednn_disabled":  # the user's torch.backends.mkldnn.enabled = False is obeyed
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    if case == "other_layout":
        x, r = x.contiguous(), r.contiguous()
    if case == "bfloat16":
        x, r = x.bfloat16(), r.bfloat16()
    with torch.enable_grad() if case == "grad_enabled" else torch.no_grad():
        assert packed(x, r, True) is None


def _pair(layout="nchw"):
    torch.manual_seed(0)
    eager = models.resnet18(fused=False, num_classes=10).eval()
    fused_model = fuse(copy.deepcopy(eager))
    if layout == "nhwc":
        eager, fused_model = (m.to(memory_format=torch.channels_last) for m in (eager, fused_model))
    return eager, fused_model


def _prepared_convs(model):
    return [p for m in model.modules() for p in (m.__dict__.get("_prepared") or [])]


def _count_packed_calls(monkeypatch):
    """A list to which every conv the prepacked form runs (one of its routes: ``PackedConv._run``, reached
    through ``__call__`` or a prepared conv's per-signature runner) appends True."""
    calls = []
    original = _onednn.PackedConv._run

    def counting(self, *args):
        out = original(self, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(_onednn.PackedConv, "_run", counting)
    return calls


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_prepared_model_runs_every_conv_on_its_reorder(layout, grad_mode, monkeypatch):
    eager, fused_model = _pair(layout)
    fused_resnet.prepare_for_inference(fused_model)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in eager.modules())
    prepared = _prepared_convs(fused_model)
    assert len(prepared) == convs and all(p.packed is not None for p in prepared)
    calls = _count_packed_calls(monkeypatch)
    x = act((2, 3, 32, 32), F32, layout, "cpu")
    with grad_mode():
        assert_close(fused_model(x), eager(x), F32, name="logits")
    assert calls == [True] * convs


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.mul_(1.5)


def test_prepared_model_follows_load_state_dict_train_and_in_place_edits():
    eager, fused_model = _pair()
    x = torch.randn(2, 3, 32, 32)
    fused_resnet.prepare_for_inference(fused_model)
    _perturb(eager)
    fused_model.load_state_dict(eager.state_dict())  # drops the preparation
    assert _prepared_convs(fused_model) == []
    with torch.inference_mode():
        assert_close(fused_model(x), eager(x), F32, name="after load_state_dict")
    fused_resnet.prepare_for_inference(fused_model)
    with torch.no_grad():  # in place, behind the model's back: the guard sees it, warns, and refolds
        for a, b in ((eager.layer1[0].bn1.running_mean, fused_model.layer1[0].bn1.running_mean),
                     (eager.layer3[0].conv1.weight, fused_model.layer3[0].conv1.weight)):
            a.add_(0.25), b.add_(0.25)
        with pytest.warns(UserWarning, match="prepare_for_inference"):
            out = fused_model(x)
        assert_close(out, eager(x), F32, name="after in-place edits")
    fused_resnet.prepare_for_inference(fused_model)
    fused_model.train()
    assert _prepared_convs(fused_model) == []


def test_copies_start_unprepared_and_threads_share_a_prepared_model():
    eager, fused_model = _pair()
    fused_resnet.prepare_for_inference(fused_model)
    buffer = io.BytesIO()
    torch.save(fused_model, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(fused_model), torch.load(buffer, weights_only=False)):
        assert _prepared_convs(copied) == []
    x = [torch.randn(2, 3, 32, 32) for _ in range(4)]
    want = [eager(t) for t in x]
    errors = []

    def work(i):
        try:
            with torch.inference_mode():
                for _ in range(3):
                    assert_close(fused_model(x[i]), want[i], F32, name=f"thread {i}")
        except AssertionError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_prepared_conv_on_other_backends_runs_conv_bias_act():
    conv, bn = torch.nn.Conv2d(8, 12, 3, padding=1, bias=False), torch.nn.BatchNorm2d(12).eval()
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0)
    with fused_resnet.use_backend("reference"):
        prepared = PreparedConv(conv, bn)
        assert prepared.packed is None and prepared.backend == "reference"
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        assert_close(prepared(x, None, True), torch.relu(bn(conv(x))), F32, name="out")


@pytest.mark.parametrize("bad", ["channels", "residual_shape", "too_small"])
def test_prepared_conv_sends_bad_input_to_the_op_layer_checks(bad):
    conv, bn = torch.nn.Conv2d(8, 12, 3, padding=1, bias=False), torch.nn.BatchNorm2d(12).eval()
    prepared = PreparedConv(conv, bn)
    x, residual = torch.randn(2, 8, 9, 7), None
    if bad == "channels":
        x = torch.randn(2, 6, 9, 7)
    elif bad == "residual_shape":
        residual = torch.randn(2, 12, 9, 6)
    else:
        prepared = PreparedConv(torch.nn.Conv2d(8, 12, 5, padding=0, bias=False), bn)
        x = torch.randn(2, 8, 3, 3)
    with torch.no_grad(), pytest.raises(RuntimeError, match="fused_resnet"):
        prepared(x, residual, True)


def test_prepacked_conv_reorders_per_input_shape_and_keeps_few():
    """oneDNN's reorder depends on the input's size: one per shape, each right, a bounded number kept."""
    x, w, b, r, conv = _inputs("nhwc")
    packed = _onednn.prepack_conv(w, b, *conv)
    with torch.no_grad():
        for n in range(1, 2 * _onednn._MAX_SHAPES + 1):
            xs = act((n, 8, 7, 6), F32, "nhwc", "cpu")
            out = packed(xs, None, True)
            assert_close(out, reference.conv_bias_act(xs, w, b, None, *conv, True), F32, name=f"batch {n}")
            assert 1 <= len(packed.packed) <= _onednn._MAX_SHAPES
        again = packed(x, None, True)  # a shape seen before (or anew): the same results
        assert_close(again, reference.conv_bias_act(x, w, b, None, *conv, True), F32, name="again")

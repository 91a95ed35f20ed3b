"""The native CPU conv_bias_act's oneDNN path (csrc/cpu/onednn_conv.cpp): weights reordered once
and cached, every change to a weight seen, nothing cached that could go stale, and the results of
the reference throughout."""

from __future__ import annotations

import threading

import pytest
import torch
from _native_helpers import act, require_native

from fused_resnet import fuse, models, reference
from fused_resnet.backends import native
from fused_resnet._tolerances import assert_close

require_native()
ops = torch.ops.fused_resnet_native
F32 = torch.float32

if not torch.backends.mkldnn.is_available():
    pytest.skip("torch was built without oneDNN: the native CPU backend has no oneDNN path", allow_module_level=True)

CONV = ([1, 1], [1, 1], [1, 1], 1)  # stride, padding, dilation, groups


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch):
    monkeypatch.setenv("FUSED_RESNET_ONEDNN_MIN_MACS", "0")  # every conv takes the path, tiny ones too
    native.clear_packed_weights()
    yield
    native.clear_packed_weights()


def _inputs(layout="nchw", weight_layout="nchw"):
    x = act((2, 8, 9, 7), F32, layout, "cpu")
    w = torch.randn(12, 8, 3, 3) / 8
    if weight_layout == "nhwc":
        w = w.contiguous(memory_format=torch.channels_last)
    return x, w, torch.randn(12), act((2, 12, 9, 7), F32, layout, "cpu")


def _run_and_check(x, w, b, r):
    args = (x, w, b, r, *CONV, True)
    out = ops.conv_bias_act(*args)
    assert_close(out, reference.conv_bias_act(*args), F32, name="out")
    return out


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_a_weight_is_reordered_once_when_it_comes_back(grad_mode):
    x, w, b, r = _inputs()
    with grad_mode():
        _run_and_check(x, w, b, r)
        assert native.packed_weight_count() == 0  # seen once: maybe a weight made anew for each call
        _run_and_check(x, w, b, r)
        assert native.packed_weight_count() == 1
        _run_and_check(x, w, b, r)
        _run_and_check(x, w, None, None)
        assert native.packed_weight_count() == 1


def test_a_weight_new_on_every_call_is_never_reordered():
    x, w, b, r = _inputs()
    with torch.no_grad():
        for _ in range(3):  # as a fold inside a torch.compile graph would give
            _run_and_check(x, w * 1.0, b, r)
    assert native.packed_weight_count() == 0


def _twice(x, w, b, r):
    _run_and_check(x, w, b, r)
    return _run_and_check(x, w, b, r)  # the second call is the one that reorders and uses it


def test_in_place_change_of_the_weight_is_seen():
    x, w, b, r = _inputs()
    with torch.no_grad():
        before = _twice(x, w, b, r)
        w.mul_(-1.5)
        after = _twice(x, w, b, r)
        w[0].zero_()  # through a view: the version counter is shared with the base
        _twice(x, w, b, r)
    assert not torch.equal(before, after)


def test_replaced_data_is_seen():
    x, w, b, r = _inputs()
    with torch.no_grad():
        _twice(x, w, b, r)
        w.data = torch.randn_like(w)
        _twice(x, w, b, r)
        w.set_(torch.randn(12, 8, 3, 3))
        _twice(x, w, b, r)


def test_other_geometry_or_layout_is_not_served_the_same_reorder():
    x, w, b, _ = _inputs()
    with torch.no_grad():
        for stride, padding, dilation in ([1, 0, 1], [2, 1, 1], [1, 2, 2]):
            args = (x, w, b, None, [stride] * 2, [padding] * 2, [dilation] * 2, 1, False)
            for _ in range(2):
                assert_close(ops.conv_bias_act(*args), reference.conv_bias_act(*args), F32, name=f"{stride, padding}")
        _twice(x.contiguous(memory_format=torch.channels_last), w, b, None)


def test_the_reorders_of_dead_weights_are_dropped():
    x, _, b, r = _inputs()
    with torch.no_grad():
        for _ in range(5):
            w = torch.randn(12, 8, 3, 3)
            _twice(x, w, b, r)
        assert native.packed_weight_count() == 1  # only the live one: the others' entries are swept
        del w
    assert native.packed_weight_count() == 0


@pytest.mark.parametrize("case", ["grad_enabled", "inference_tensor_weight", "onednn_disabled", "bfloat16"])
def test_nothing_is_cached_where_it_could_go_stale_or_would_not_be_reused(case, monkeypatch):
    x, w, b, r = _inputs()
    if case == "grad_enabled":
        _twice(x, w.requires_grad_(), b, r)
    elif case == "inference_tensor_weight":  # no version counter: an in-place change could not be seen
        with torch.inference_mode():
            w = w.clone()
            _twice(x, w, b, r)
            w.add_(1.0)
            _twice(x, w, b, r)
    elif case == "onednn_disabled":  # the user's torch.backends.mkldnn.enabled = False is obeyed
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
        with torch.no_grad():
            _twice(x, w, b, r)
    else:  # half precision runs the generic composition (its conv in fp32 on the CPU)
        with torch.no_grad():
            args = (x.bfloat16(), w.bfloat16(), b, r.bfloat16(), *CONV, True)
            for _ in range(2):
                assert_close(ops.conv_bias_act(*args), reference.conv_bias_act(*args), torch.bfloat16, name="out")
    assert native.packed_weight_count() == 0


def test_by_default_tiny_convs_keep_the_composition(monkeypatch):
    monkeypatch.delenv("FUSED_RESNET_ONEDNN_MIN_MACS")
    x, w, b, r = _inputs()  # ~0.1 M multiply-adds: oneDNN's per-call setup would cost more than it saves
    with torch.no_grad():
        _twice(x, w, b, r)
        assert native.packed_weight_count() == 0
        big_x, big_w = act((2, 64, 16, 16), F32, "nhwc", "cpu"), torch.randn(64, 64, 3, 3) / 24
        args = (big_x, big_w, None, None, *CONV, True)
        for _ in range(2):
            assert_close(ops.conv_bias_act(*args), reference.conv_bias_act(*args), F32, name="out")
        assert native.packed_weight_count() == 1


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_nchw_input_much_larger_than_the_weight_keeps_the_composition(layout):
    # oneDNN would convert the NCHW activations to channels_last and back: not worth a small weight.
    x, w = act((2, 16, 32, 32), F32, layout, "cpu"), torch.randn(16, 16, 3, 3) / 12
    with torch.no_grad():
        for _ in range(2):
            args = (x, w, None, None, *CONV, True)
            assert_close(ops.conv_bias_act(*args), reference.conv_bias_act(*args), F32, name="out")
    assert native.packed_weight_count() == (1 if layout == "nhwc" else 0)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("weight_layout", ["nchw", "nhwc"])
def test_output_follows_the_input_layout_whatever_the_weight_layout(layout, weight_layout):
    x, w, b, r = _inputs(layout, weight_layout)
    with torch.no_grad():
        out = _twice(x, w, b, r)
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)


def test_concurrent_callers_get_their_own_results():
    x, _, b, r = _inputs()
    weights = [torch.randn(12, 8, 3, 3) for _ in range(4)]
    errors = []

    def work(w):
        try:
            with torch.no_grad():
                for _ in range(10):
                    _run_and_check(x, w, b, r)
        except AssertionError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in weights]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert native.packed_weight_count() == len(weights)


def test_fused_model_in_inference_mode_reorders_each_folded_weight_once_and_follows_new_weights():
    torch.manual_seed(0)
    eager = models.resnet18(fused=False, num_classes=10).eval()
    fused_model = fuse(models.resnet18(fused=False, num_classes=10)).eval()
    fused_model.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 32, 32)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in eager.modules())
    with torch.inference_mode():
        for _ in range(2):
            assert_close(fused_model(x), eager(x), F32, name="logits")
        assert native.packed_weight_count() == convs
    with torch.no_grad():  # new weights and BN statistics: folded and reordered anew
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in eager.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.mul_(1.5)
    fused_model.load_state_dict(eager.state_dict())
    with torch.inference_mode():
        for _ in range(2):
            assert_close(fused_model(x), eager(x), F32, name="logits after new weights")
    assert native.packed_weight_count() == convs  # the old folded weights died with their reorders

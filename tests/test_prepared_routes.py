"""The native CPU backend's serving routes (backends/native/_onednn.py) other than oneDNN's: a 1x1
conv as one matrix product ("gemm"), in NCHW and channels_last, with the reference's results for every
epilogue; and the static rule's choice on the conv shapes of MobileNetV2 and ResNet-50 at 224px,
on which its thresholds were measured; and real models prepared in both layouts within eager fp32's
error."""

from __future__ import annotations

import copy

import pytest
import torch
from _native_helpers import act, require_native
from _parity import randomize_bns

import fused_resnet
from fused_resnet import _activation, reference
from fused_resnet._tolerances import assert_close, relative_error, tolerance

require_native()
from fused_resnet.backends.native import _onednn  # (needs the extension's backend)

F32 = torch.float32
POINTWISE = ([1, 1], [0, 0], [1, 1], 1)  # stride, padding, dilation, groups

if _onednn._OPS is None:
    pytest.skip("this torch has no oneDNN convolution ops: the native CPU backend has no oneDNN path",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def default_threshold(monkeypatch):
    monkeypatch.delenv("FUSED_RESNET_ONEDNN_MIN_MACS", raising=False)  # the rule as served


def _pointwise(layout, n, cin=16, cout=24, hw=(5, 7)):
    x = act((n, cin, *hw), F32, layout, "cpu") * 2  # the pre-activation straddles ReLU6's and Hardswish's kinks
    w = torch.randn(cout, cin, 1, 1) / cin ** 0.5
    return x, w, torch.randn(cout), act((n, cout, *hw), F32, layout, "cpu") * 2


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("epilogue", ["bias_res", "bias", "res", "none"])
@pytest.mark.parametrize("code", sorted(_activation.NAMES), ids=lambda c: str(_activation.NAMES[c]))
def test_gemm_route_matches_the_reference(layout, n, epilogue, code):
    x, w, b, r = _pointwise(layout, n)
    bias = b if "bias" in epilogue else None
    residual = r if "res" in epilogue else None
    packed = _onednn.prepack_conv(w, bias, *POINTWISE)
    assert packed._can_gemm(x)
    x_before = x.clone()
    r_before = None if residual is None else residual.clone()
    want = reference.conv_bias_act(x.double(), w.double(), None if bias is None else bias.double(),
                                   None if residual is None else residual.double(), *POINTWISE, code)
    with torch.inference_mode():
        for _ in range(2):  # nothing of the first call (bias column, views) may change the second
            out = packed._run("gemm", x, residual, code)
            assert_close(out, want.float(), F32, name="out")
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert torch.equal(x, x_before) and (residual is None or torch.equal(residual, r_before))  # inputs untouched


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gemm_route_serves_small_pointwise_convs_and_residuals_with_any_activation(layout):
    """Through ``__call__`` (the static rule): a small 1x1 conv takes the gemm route, with a residual
    too, and with a residual and an activation oneDNN's binary op cannot apply (SiLU), which used to
    go to the generic op."""
    x, w, b, r = _pointwise(layout, 2)
    packed = _onednn.prepack_conv(w, b, *POINTWISE)
    with torch.no_grad():
        for residual, code in ((None, _activation.RELU6), (r, _activation.NONE), (r, _activation.SILU)):
            out = packed(x, residual, code)
            assert out is not None
            assert_close(out, reference.conv_bias_act(x, w, b, residual, *POINTWISE, code), F32, name="out")
    assert set(packed.routes.values()) == {"gemm"} and not packed.packed  # no oneDNN reorder made


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("n", [1, 2])
def test_gemm_route_takes_a_residual_of_the_other_layout(layout, n):
    """``PreparedConv`` checks a residual's shape and dtype, not its strides: one in the other layout
    (or not dense) is read by its logical indices; the output follows the input's layout."""
    x, w, b, r = _pointwise(layout, n)
    other = r.contiguous() if layout == "nhwc" else r.contiguous(memory_format=torch.channels_last)
    packed = _onednn.prepack_conv(w, b, *POINTWISE)
    with torch.no_grad():
        for residual in (other, act((n, 24, 5, 14), F32, "nchw", "cpu")[..., ::2]):
            out = packed._run("gemm", x, residual, _activation.RELU)
            assert_close(out, reference.conv_bias_act(x, w, b, residual, *POINTWISE, _activation.RELU), F32,
                         name="out")
            assert out.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)


@pytest.mark.parametrize("case", ["strided", "padded", "grouped", "3x3", "sliced_input"])
def test_gemm_route_declines_what_is_not_a_plain_matrix_product(case):
    x, w, b, _ = _pointwise("nchw", 2)
    conv = {"strided": ([2, 2], [0, 0], [1, 1], 1), "padded": ([1, 1], [1, 1], [1, 1], 1),
            "grouped": ([1, 1], [0, 0], [1, 1], 4)}.get(case, POINTWISE)
    if case == "grouped":
        w = w[:, :4].contiguous()
    if case == "3x3":
        w, conv = torch.randn(24, 16, 3, 3) / 12, ([1, 1], [1, 1], [1, 1], 1)
    if case == "sliced_input":  # neither NCHW- nor channels_last-dense
        x = act((2, 16, 5, 14), F32, "nchw", "cpu")[..., ::2]
    packed = _onednn.prepack_conv(w, b, *conv)
    assert not packed._can_gemm(x)
    with torch.no_grad():
        assert packed._route(x, None) != "gemm"
        out = packed(x, None, _activation.RELU)
    if out is not None:
        assert_close(out, reference.conv_bias_act(x, w, b, None, *conv, _activation.RELU), F32, name="out")


# (Cin, Cout, kernel, stride, groups, H=W, residual, NCHW route, channels_last route) at batch 1, on a
# CPU whose conv kernels run AVX2 (the Intel Xeon these were measured on).
RULE_CASES = [
    # MobileNetV2 at 224px
    (32, 16, 1, 1, 1, 112, False, "gemm", "gemm"),
    (96, 24, 1, 1, 1, 56, False, "gemm", "gemm"),
    (144, 24, 1, 1, 1, 56, True, "gemm", "gemm"),
    (32, 192, 1, 1, 1, 28, False, "gemm", "gemm"),
    (576, 96, 1, 1, 1, 14, True, "gemm", "gemm"),  # 10.8 M multiply-adds: above the oneDNN threshold
    (960, 160, 1, 1, 1, 7, True, "gemm", "gemm"),
    (320, 1280, 1, 1, 1, 7, False, "gemm", "gemm"),  # 20 M, 49 pixels, a 410K weight
    (144, 144, 3, 1, 144, 56, False, None, "onednn"),  # depthwise
    (960, 960, 3, 1, 960, 7, False, None, "onednn"),
    (3, 32, 3, 2, 1, 224, False, "aten", "onednn"),  # the stem: NCHW input much larger than the weight
    # EfficientNet-B0 at 224px
    (1152, 192, 1, 1, 1, 7, True, "gemm", "gemm"),
    (1152, 1152, 5, 1, 1152, 7, False, None, "onednn"),
    # ResNet-50 at 224px
    (1024, 256, 1, 1, 1, 14, False, "gemm", "onednn"),  # 51 M
    (256, 1024, 1, 1, 1, 14, True, "gemm", "onednn"),
    (2048, 512, 1, 1, 1, 7, False, "onednn", "onednn"),  # 49 pixels, a 1M weight
    (512, 2048, 1, 1, 1, 7, True, "onednn", "onednn"),
    (1024, 512, 1, 2, 1, 14, False, "onednn", "onednn"),  # strided 1x1: not a plain product
    (256, 256, 3, 1, 1, 14, False, "onednn", "onednn"),
]


# The same on an AVX-512 CPU (the AMD EPYC these were measured on; oneDNN vs ATen vs the GEMM): in
# channels_last oneDNN's bound is 1 M multiply-adds, the GEMM's 4 M; in NCHW a 1x1 conv above 8 M is
# not a GEMM.
AVX512_RULE_CASES = [
    (16, 16, 3, 1, 1, 32, False, "aten", "onednn"),  # CIFAR ResNet's first stage, 2.4 M: 47 vs 91 us (ATen)
    (32, 64, 3, 2, 1, 16, False, "aten", "onednn"),  # 1.2 M: 32 vs 43 us
    (64, 64, 3, 1, 1, 8, True, None, "onednn"),  # with a residual; NCHW below 8 M: the op
    (16, 16, 3, 1, 1, 16, False, "aten", "aten"),  # 0.6 M: 28 vs 28 us
    (16, 32, 1, 2, 1, 32, False, "aten", "aten"),  # 0.13 M strided 1x1: 24 vs 10 us
    (64, 64, 1, 1, 1, 8, False, "gemm", "gemm"),  # 0.26 M: 28 vs 13 us (GEMM)
    (32, 192, 1, 1, 1, 28, False, "gemm", "onednn"),  # MobileNetV2, 4.8 M: 52 vs 67 us (GEMM)
    (1152, 192, 1, 1, 1, 7, True, "onednn", "onednn"),  # EfficientNet-B0, 10.8 M: 76 vs 154 us (GEMM); NCHW 110 vs 168
    (1024, 256, 1, 1, 1, 14, False, "onednn", "onednn"),  # ResNet-50, 51 M: NCHW 402 vs 675 us (GEMM)
    (256, 64, 1, 1, 1, 56, False, "aten", "onednn"),  # ResNet-50, 51 M: NCHW 353 (ATen) vs 632 (GEMM) vs 645 us
    # NCHW 1x1 convs on small maps: a GEMM of few columns (RegNetY-400MF's, ResNet-50's last stage at 64 px)
    (440, 440, 1, 1, 1, 2, False, "onednn", "gemm"),  # NCHW 60 vs 201 us (GEMM)
    (2048, 512, 1, 1, 1, 2, True, "onednn", "onednn"),  # NCHW 101 vs 963 us
    (440, 440, 1, 1, 1, 4, True, "onednn", "gemm"),  # 3.1 M: NCHW 72 vs 90 us
    (208, 208, 1, 1, 1, 4, False, "gemm", "gemm"),  # 0.7 M: NCHW 38 vs 22 us
    (1024, 1024, 1, 1, 1, 1, False, "gemm", "gemm"),  # one pixel, a matrix-vector product: 79 vs 63 us
]


def _rule_route(case, layout):
    cin, cout, k, s, groups, hw, res, nchw_route, nhwc_route = case
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    w = torch.empty(cout, cin // groups, k, k).contiguous(memory_format=fmt)
    packed = _onednn.prepack_conv(w, torch.empty(cout), [s, s], [k // 2] * 2, [1, 1], groups)
    x = torch.empty(1, cin, hw, hw).contiguous(memory_format=fmt)
    residual = torch.empty(1, cout, hw // s, hw // s).contiguous(memory_format=fmt) if res else None
    return packed._route(x, residual), (nhwc_route if layout == "nhwc" else nchw_route)


def _case_id(c):
    return f"{c[0]}-{c[1]}-k{c[2]}s{c[3]}g{c[4]}-{c[5]}px" + ("-res" if c[6] else "")


@pytest.mark.parametrize("case", RULE_CASES, ids=_case_id)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_rule_chooses_the_measured_route(case, layout, monkeypatch):
    """The static rule on the shapes whose timings set it (see ``PackedConv._route``), for an AVX2 CPU."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    chosen, measured = _rule_route(case, layout)
    assert chosen == measured


@pytest.mark.parametrize("case", AVX512_RULE_CASES, ids=_case_id)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_avx512_rule_chooses_the_measured_route(case, layout, monkeypatch):
    """The static rule on an AVX-512 CPU (``route_bounds``): oneDNN's and the GEMM's bounds lower in
    channels_last, a GEMM bound in NCHW, oneDNN for NCHW 1x1 convs on small maps."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    chosen, measured = _rule_route(case, layout)
    assert chosen == measured


@pytest.mark.parametrize("spec", ["tv:mobilenet_v2", "timm:efficientnet_b0", "timm:dla34"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("n", [1, 2])
def test_prepared_models_within_eager_error_in_both_layouts(spec, layout, n):
    """Real models, fused and prepared (every route the rule takes on them), in fp32: within 3x eager
    fp32's own error vs fp64, in the input's layout; the gemm route served some convs."""
    lib, name = spec.split(":")
    library = pytest.importorskip("torchvision.models" if lib == "tv" else "timm")  # the rest of the file runs without
    torch.manual_seed(0)
    plain = getattr(library, name)() if lib == "tv" else library.create_model(name, pretrained=False)
    plain = randomize_bns(plain).eval()
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    gold = copy.deepcopy(plain).double()
    plain = plain.to(memory_format=fmt)
    prepared = fused_resnet.prepare_for_inference(fused_resnet.fuse(copy.deepcopy(plain)))
    packs = [p.packed for m in prepared.modules() for p in (m.__dict__.get("_prepared") or [])]
    x = act((n, 3, 64, 64), F32, layout, "cpu")
    with fused_resnet.use_backend("native"), torch.no_grad():
        want, eager_out, out = gold(x.double()), plain(x), prepared(x)
    assert relative_error(out, want) <= 3 * relative_error(eager_out, want) + tolerance(F32)
    assert out.is_contiguous(memory_format=fmt) == eager_out.is_contiguous(memory_format=fmt)
    routes = {r for p in packs for r in p.routes.values()}
    assert "gemm" in routes

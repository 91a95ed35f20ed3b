"""fuse() with activations other than ReLU (issue #13): torchvision's MobileNetV2 (ReLU6), timm's
EfficientNet-B0 (SiLU, in its BatchNormAct2d) and both MobileNetV3-Large (Hardswish and ReLU; timm's
stem and ConvBnAct block, torchvision's InvertedResidual joins) get their activations applied by the
fused kernels;
the fused models compute what the unfused ones do (fp64 on the reference backend: outputs, every
gradient, running statistics, train and eval, prepared eval; fp32 on the native backend), and a
chain whose activation module is replaced falls back to it."""

from __future__ import annotations

import copy

import pytest
import torch
from _parity import assert_native_fp32_train_and_eval, assert_step_matches, randomize_bns
from torch import nn

import fused_resnet
from fused_resnet import modules
from fused_resnet._tolerances import relative_error

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

F64 = torch.float64
MODELS = ["tv:mobilenet_v2", "timm:efficientnet_b0", "tv:mobilenet_v3_large", "timm:mobilenetv3_large_100"]


def build(spec: str, **kw) -> nn.Module:
    lib, name = spec.split(":")
    if lib == "tv":
        return getattr(torchvision.models, name)(**kw)
    return timm.create_model(name, pretrained=False, **kw)


def _x(dtype=F64, n=2):
    return torch.randn(n, 3, 64, 64, dtype=dtype)  # 32px leaves 1x1 maps: BN over 2 values, ill-conditioned


def _pair(spec: str, **kw) -> tuple[nn.Module, nn.Module]:
    plain = randomize_bns(build(spec, **kw).to(F64))
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


def _fused_activations(model: nn.Module) -> tuple[int, int]:
    """(activations a fused conv applies, activation modules of the kinds the kernels take)."""
    kinds = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish)
    total = sum(isinstance(m, kinds) for m in model.modules())
    fused = sum(isinstance(m, modules.FusedAwayActivation) for m in model.modules())
    fused += sum(m.__dict__.get("fused_relu", False) and m.fused_relu_module is None
                 for m in model.modules() if isinstance(m, modules.FusedConvBN2d))  # timm BatchNormAct2d's act
    return fused, total


@pytest.mark.parametrize("spec, bns, acts, codes, joins", [
    ("tv:mobilenet_v2", 52, 35, {2}, 10), ("timm:efficientnet_b0", 49, 33, {3}, 9),
    # 20 Hardswish + 11 ReLU after a BN; the 21st Hardswish follows the classifier's Linear (torchvision) or
    # the head conv with a bias (timm); the SE modules' ReLU and Hardsigmoid follow convs with biases.
    ("tv:mobilenet_v3_large", 46, 31, {1, 4}, 10), ("timm:mobilenetv3_large_100", 46, 31, {1, 4}, 10)])
def test_activations_fused(spec, bns, acts, codes, joins):
    """Every BN fused; every ReLU6 / SiLU / Hardswish after a fused BN applied by its conv (the SE
    modules' activations follow a conv with a bias, no BN: they run as they are); the residual blocks'
    last BN with the add (MobileNetV2, MobileNetV3, timm's EfficientNet blocks with ``has_skip``)."""
    model = fused_resnet.fuse(build(spec))
    report = fused_resnet.fusion_report(model)
    assert sum(v.startswith("fused") for v in report.values()) == len(report) == bns
    fused, _ = _fused_activations(model)
    assert fused == acts
    assert {m.fused_act for m in model.modules() if isinstance(m, modules.FusedConvBN2d) and m.fused_relu} == codes
    assert sum(v.startswith("fused: with the residual add") for v in report.values()) == joins


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spec", MODELS)
def test_fp64_parity_reference_backend(spec, train):
    plain, fused = _pair(spec)
    with fused_resnet.use_backend("reference"):
        for _ in range(2 if train else 1):
            assert_step_matches(plain, fused, _x(), train)


def test_efficientnet_skip_join_with_drop_path_fp64():
    """timm's EfficientNet blocks' skip add with an active DropPath: its per-sample keep-scale is the
    join's gate, drawn by timm's own module (the same random numbers as unfused)."""
    plain, fused = _pair("timm:efficientnet_b0", drop_path_rate=0.3)
    report = fused_resnet.fusion_report(fused)
    assert sum(v.startswith("fused: with the residual add") for v in report.values()) == 9
    with fused_resnet.use_backend("reference"):
        for train in (True, True, False):
            assert_step_matches(plain, fused, _x(), train)


@pytest.mark.parametrize("spec", MODELS)
def test_prepared_eval_fp64(spec):
    plain = randomize_bns(build(spec).to(F64)).eval()
    fused = fused_resnet.prepare_for_inference(fused_resnet.fuse(copy.deepcopy(plain)))
    x = _x()
    with fused_resnet.use_backend("reference"), torch.no_grad():
        assert relative_error(fused(x), plain(x)) <= 1e-9


@pytest.mark.parametrize("spec", MODELS)
def test_fp32_native_within_eager_error(spec):
    """fp32 on the native backend, training step: output and gradients within 3x eager fp32's own
    error vs fp64; eval and prepared eval (oneDNN post-ops: hardtanh, swish, hardswish) within the same bound."""
    if "native" not in fused_resnet.backends():
        pytest.skip("the native extension is not built for this torch")
    assert_native_fp32_train_and_eval(randomize_bns(build(spec)), _x(torch.float32))


def test_replaced_activation_falls_back():
    """A fused ReLU6 replaced by another module after fuse: the conv stops applying it, the new one runs."""
    plain, fused = _pair("tv:mobilenet_v2")
    for model in (plain, fused):
        model.features[1].conv[0][2] = nn.Hardswish()
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(), train)


def test_hardtanh_0_6_fused_like_relu6():
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh(0.0, 6.0),
                        nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Hardtanh(-1.0, 1.0))
    plain = randomize_bns(seq.to(F64))
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    assert type(fused[2]) is modules.FusedAwayHardtanh and type(fused[5]) is nn.Hardtanh
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(n=3) * 3, train)
    fused_resnet.unfuse(fused)
    assert type(fused[2]) is nn.Hardtanh and type(fused[0]) is nn.Conv2d


@pytest.mark.parametrize("act_layer", ["silu", "relu6", "hard_swish"])
def test_timm_resnet_blocks_with_another_activation_fused_whole(act_layer):
    """timm ResNet blocks built with ``act_layer``: fused whole as with ReLU, the activation in the
    next conv's prologue and after the add (fp64 parity, train and eval)."""
    plain = randomize_bns(timm.create_model("resnet18", pretrained=False, act_layer=act_layer).to(F64))
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    report = fused_resnet.fusion_report(fused)
    assert report["layer2.0.bn2"].startswith("fused: in the residual block"), report["layer2.0.bn2"]
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(), train)


def test_timm_mobilenetv3_head_norm_fused():
    """timm MobileNetV3 built with ``head_norm`` (and no head bias): its head conv -> BatchNormAct2d
    (Hardswish) after the global pool is fused like the stem (fp64 parity, train and eval)."""
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, head_norm=True, head_bias=False)
    plain = randomize_bns(model.to(F64))
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    report = fused_resnet.fusion_report(fused)
    assert report["norm_head"] == "fused: into the preceding conv, with its hardswish"
    assert report["bn1"] == "fused: into the preceding conv, with its hardswish"
    assert all(v.startswith("fused") for v in report.values()), report
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(n=4), train)

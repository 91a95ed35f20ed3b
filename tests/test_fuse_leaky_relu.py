"""fuse() with LeakyReLU (issue #13, YOLO-style nets): timm's CSP/Darknet family (``cspdarknet53``,
``darknet53``, ``cspresnet50``: ``nn.LeakyReLU()``, slope 0.01, in their ``BatchNormAct2d``) and a
hand-written YOLO-style conv -> BN -> LeakyReLU chain model with slopes 0.1 and 0.01 get the
activation applied by the fused kernels (codes 5 and 6); a third slope (0.2) is not one of them: its
BN is still fused into the conv, the LeakyReLU runs as its own module and ``fusion_report`` says so.
Every fused model computes what the unfused one does (fp64 on the reference backend: outputs, every
gradient, running statistics, train and eval, prepared eval; fp32 on the native backend within
eager's own error)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _parity import assert_native_fp32_train_and_eval, assert_step_matches, randomize_bns
from torch import nn

import fused_resnet
from fused_resnet import _activation, modules
from fused_resnet._tolerances import relative_error

timm = pytest.importorskip("timm")

F64 = torch.float64
# name -> (BatchNorms, LeakyReLUs the fused convs apply); every BN of them is fused. cspresnet50's other 13
# LeakyReLUs follow its BottleneckBlocks' residual adds (``act3``), which run as they are.
TIMM = {"cspdarknet53": (67, 67), "darknet53": (52, 52), "cspresnet50": (55, 38)}
_UNFUSED_NOTE = ("its LeakyReLU(negative_slope=0.2) runs as its own module: the kernels apply the slopes 0.01 "
                 "and 0.1 only")


def _x(dtype=F64, n=2, size=64):
    return torch.randn(n, 3, size, size, dtype=dtype)


def _applied_leaky(model: nn.Module) -> int:
    """LeakyReLUs a fused conv applies: pass-through modules, and timm BatchNormAct2d acts (no module swap)."""
    count = sum(isinstance(m, modules.FusedAwayLeakyReLU) for m in model.modules())
    return count + sum(m.fused_relu and m.fused_relu_module is None and m.fused_act in _activation.SLOPES
                       for m in model.modules() if isinstance(m, modules.FusedConvBN2d))


@pytest.mark.parametrize("name", TIMM)
def test_timm_csp_darknet_coverage(name):
    """Every BN fused, every LeakyReLU right after one applied by its conv with code 5 (slope 0.01)."""
    model = timm.create_model(name, pretrained=False)
    assert fused_resnet.fusion_report(model) and _applied_leaky(model) == 0
    fused_resnet.fuse(model)
    report = fused_resnet.fusion_report(model)
    bns, acts = TIMM[name]
    assert sum(v.startswith("fused") for v in report.values()) == len(report) == bns, report
    assert _applied_leaky(model) == acts
    assert {m.fused_act for m in model.modules() if isinstance(m, modules.FusedConvBN2d) and m.fused_relu} == {
        _activation.LEAKY_RELU}
    assert sum(v.endswith("with its leaky_relu") for v in report.values()) == acts


def _cspdarknet_pair():
    plain = randomize_bns(timm.create_model("cspdarknet53", pretrained=False).to(F64))
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cspdarknet53_fp64_parity_reference_backend(train):
    plain, fused = _cspdarknet_pair()
    with fused_resnet.use_backend("reference"):
        assert_step_matches(plain, fused, _x(), train)


def test_cspdarknet53_prepared_eval_fp64():
    plain, fused = _cspdarknet_pair()
    plain.eval()
    prepared = fused_resnet.prepare_for_inference(fused.eval())
    x = _x()
    with fused_resnet.use_backend("reference"), torch.no_grad():
        assert relative_error(prepared(x), plain(x)) <= 1e-9


def _require_native():
    if "native" not in fused_resnet.backends():
        pytest.skip("the native extension is not built for this torch")


def test_cspdarknet53_fp32_native_within_eager_error():
    _require_native()
    assert_native_fp32_train_and_eval(randomize_bns(timm.create_model("cspdarknet53", pretrained=False)), _x(torch.float32))


def _cbl(c_in: int, c_out: int, k: int, slope: float, stride: int = 1, inplace: bool = False) -> nn.Sequential:
    """YOLO's "CBL" unit: conv (no bias) -> BN -> LeakyReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.LeakyReLU(slope, inplace=inplace))


class _DarkResidual(nn.Module):
    """YOLOv3's residual unit, written by hand: ``x + cbl3x3(cbl1x1(x))``."""

    def __init__(self, c: int, slope: float):
        super().__init__()
        self.reduce, self.expand = _cbl(c, c // 2, 1, slope), _cbl(c // 2, c, 3, slope, inplace=True)

    def forward(self, x):
        return x + self.expand(self.reduce(x))


class _LeakyJoin(nn.Module):
    """A user block whose forward applies ``F.leaky_relu`` after its residual add (the traced joins
    recognise ReLU there only: the add may be fused, the LeakyReLU runs as written)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        return F.leaky_relu(x + self.bn2(self.conv2(h)), 0.1, inplace=True)


def _yolo_style() -> nn.Module:
    return nn.Sequential(
        _cbl(3, 16, 3, 0.1), _cbl(16, 32, 3, 0.1, stride=2), _DarkResidual(32, 0.1),
        _cbl(32, 32, 3, 0.01, inplace=True), _cbl(32, 48, 3, 0.2, stride=2), _LeakyJoin(48),
        _cbl(48, 24, 1, 0.1))


def test_yolo_style_chains_fused_with_their_slopes():
    """Slopes 0.1 and 0.01 applied by the fused convs (codes 6 and 5, in-place modules too); 0.2 not: its
    BN is fused into the conv and the module runs as it is, which ``fusion_report`` says."""
    model = fused_resnet.fuse(_yolo_style())
    report = fused_resnet.fusion_report(model)
    assert all(v.startswith("fused") for v in report.values()), report
    for key in ("0.1", "1.1", "2.reduce.1", "2.expand.1", "6.1"):
        assert report[key] == "fused: into the preceding conv, with its leaky_relu_0.1", key
    assert report["3.1"] == "fused: into the preceding conv, with its leaky_relu"
    assert report["4.1"] == f"fused: into the preceding conv ({_UNFUSED_NOTE})"
    assert report["5.bn2"] == "fused: with the residual add in the forward of 5"  # F.leaky_relu after it runs
    assert type(model[4][2]) is nn.LeakyReLU and type(model[3][2]) is modules.FusedAwayLeakyReLU
    assert model[0][0].fused_act == _activation.LEAKY_RELU_0_1 and model[3][0].fused_act == _activation.LEAKY_RELU
    before = fused_resnet.fusion_report(_yolo_style())
    assert before["4.1"] == f"fusable: into 4.0 ({_UNFUSED_NOTE})" and before["3.1"] == "fusable: into 3.0 with its " \
        "leaky_relu"
    fused_resnet.unfuse(model)
    assert type(model[3][2]) is nn.LeakyReLU and type(model[3][0]) is nn.Conv2d


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_yolo_style_fp64_parity(train):
    plain = randomize_bns(_yolo_style().to(F64))
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    with fused_resnet.use_backend("reference"):
        for _ in range(2 if train else 1):
            assert_step_matches(plain, fused, _x(n=3, size=32), train)
    plain.eval()
    prepared = fused_resnet.prepare_for_inference(fused.eval())
    x = _x(n=3, size=32)
    with fused_resnet.use_backend("reference"), torch.no_grad():
        assert relative_error(prepared(x), plain(x)) <= 1e-9


def test_yolo_style_fp32_native_within_eager_error():
    _require_native()
    torch.manual_seed(0)
    assert_native_fp32_train_and_eval(randomize_bns(_yolo_style()), _x(torch.float32, n=3, size=32))


def test_slope_changed_to_another_one_is_not_fused():
    """module_code by the module's slope: 0.01 and 0.1 only, exactly those; other classes none."""
    assert _activation.module_code(nn.LeakyReLU()) == _activation.LEAKY_RELU
    assert _activation.module_code(nn.LeakyReLU(0.1, inplace=True)) == _activation.LEAKY_RELU_0_1
    for slope in (0.2, 0.0, 0.1000001, -0.1, 1.0):
        assert _activation.module_code(nn.LeakyReLU(slope)) is None
        assert "runs as its own module" in _activation.why_not(nn.LeakyReLU(slope))
    assert _activation.why_not(nn.LeakyReLU()) is None and _activation.why_not(nn.GELU()) is None


def test_timm_resnet_blocks_with_leaky_relu_fused_whole():
    """timm ResNet blocks built with ``act_layer="leaky_relu"``: fused whole as with ReLU, the LeakyReLU
    (code 5) after the residual add in the join's pass and in the next conv's prologue (fp64 parity,
    train and eval; eval's folded conv with a residual and LeakyReLU: oneDNN's binary op takes none/ReLU
    only, so the generic op runs)."""
    plain = randomize_bns(timm.create_model("resnet18", pretrained=False, act_layer="leaky_relu").to(F64))
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    report = fused_resnet.fusion_report(fused)
    assert all(v.startswith("fused") for v in report.values()), report
    assert report["layer2.0.bn2"].startswith("fused: in the residual block"), report["layer2.0.bn2"]
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(), train)


def test_timm_resnet_leaky_relu_fp32_native_within_eager_error():
    _require_native()
    torch.manual_seed(0)
    assert_native_fp32_train_and_eval(randomize_bns(timm.create_model("resnet18", pretrained=False, act_layer="leaky_relu")),
                 _x(torch.float32))


def test_timm_conv_norm_act_with_other_slopes():
    """timm ``ConvNormAct`` whose ``BatchNormAct2d`` holds a LeakyReLU of slope 0.1 (applied by the conv)
    or 0.2 (the BN fused, the act runs inside the norm's forward as before; the report says why):
    fp64 parity, train and eval."""
    from functools import partial

    from timm.layers import ConvNormAct

    def unit(c_in, c_out, slope):
        return ConvNormAct(c_in, c_out, 3, act_layer=partial(nn.LeakyReLU, negative_slope=slope))

    plain = randomize_bns(nn.Sequential(unit(3, 8, 0.2), unit(8, 8, 0.1), unit(8, 4, 0.01)).to(F64))
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    report = fused_resnet.fusion_report(fused)
    assert report == {"0.bn": f"fused: into the preceding conv ({_UNFUSED_NOTE})",
                      "1.bn": "fused: into the preceding conv, with its leaky_relu_0.1",
                      "2.bn": "fused: into the preceding conv, with its leaky_relu"}
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(n=3, size=16), train)


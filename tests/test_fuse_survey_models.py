"""Regression tests for what benchmarks/scripts/fuse_survey.py found on real torchvision / timm models
(random init, small images): each fix with the real model built small. Fused models compute what the
unfused ones do (fp64, reference backend: outputs, every gradient, running statistics)."""

import copy

import pytest
import torch
from _parity import assert_step_matches, randomize_bns
from torch import nn

import fused_resnet
from fused_resnet import _dataflow

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

F64 = torch.float64


def _x(size=64):
    return torch.randn(2, 3, size, size, dtype=F64)


def _pair(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    plain = randomize_bns(model.to(F64))
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


def _parity(plain: nn.Module, fused: nn.Module, size=64) -> None:
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(size), train)


SKIP_FLAGS = [
    ("tv", "mobilenet_v2", "use_res_connect"),
    ("tv", "mobilenet_v3_small", "use_res_connect"),
    ("timm", "efficientnet_b0", "has_skip"),
]


@pytest.mark.parametrize("lib, name, flag", SKIP_FLAGS, ids=[n for _, n, _ in SKIP_FLAGS])
def test_skip_flag_changed_after_fuse(lib, name, flag):
    """A block's ``use_res_connect`` / ``has_skip`` set to False after fuse: the fused join must not
    keep adding the skip (it did: a relative error of 2e-2 to 7e-1); the block runs its own forward,
    the report says why, and fuse called again leaves the block's add (there is none now) alone."""
    model = torchvision.models.__dict__[name](num_classes=10) if lib == "tv" else timm.create_model(
        name, pretrained=False, num_classes=10)
    plain, fused = _pair(model)
    flipped = [n for n, m in fused.named_modules() if getattr(m, flag, False)]
    assert flipped
    for m in (plain, fused):
        for n in flipped:
            setattr(m.get_submodule(n), flag, False)
    _parity(plain, fused)
    report = fused_resnet.fusion_report(fused)
    assert any("has_skip changed" in v for v in report.values())
    fused_resnet.fuse(fused)
    report = fused_resnet.fusion_report(fused)
    assert not any("with the residual add" in v for v in report.values())
    _parity(plain, fused)


def test_block_structure_traced_once_per_call(monkeypatch):
    """fuse / find_fusable / fusion_report trace a block with torchvision's children but its own forward
    (timm's DLA blocks) once per call, not once per rule that asks."""
    calls = []
    original = _dataflow.computes_as
    monkeypatch.setattr(_dataflow, "computes_as", lambda m, known: calls.append(id(m)) or original(m, known))
    model = timm.create_model("dla34", pretrained=False, num_classes=10)
    for step in (fused_resnet.find_fusable, fused_resnet.fusion_report, fused_resnet.fuse):
        calls.clear()
        step(model)
        assert calls and len(calls) == len(set(calls)), step.__name__


TIMM_STEMS = [("ese_vovnet19b_dw", 64), ("hrnet_w18_small", 64), ("ghostnet_100", 64)]


@pytest.mark.parametrize("name, size", TIMM_STEMS, ids=[n for n, _ in TIMM_STEMS])
def test_timm_separable_conv_and_stems(name, size):
    """timm's SeparableConvNormAct (VoVNet-dw: 14 of 23 BNs were not fused) and the stems of
    HighResolutionNet (bn2) and GhostNet (bn1): their conv -> BN (-> act) chains fused, exactly (HRNet's
    4 BNs after biased convs too: tests/test_fuse_conv_bias.py)."""
    plain, fused = _pair(timm.create_model(name, pretrained=False, num_classes=10))
    report = fused_resnet.fusion_report(fused)
    left = [k for k, v in report.items() if not v.startswith("fused")]
    assert not left, left
    _parity(plain, fused, size)


TRACKING = ["tv:resnet18", "tv:mobilenet_v2", "timm:efficientnet_b0", "timm:dla34", "tv:densenet121"]


@pytest.mark.parametrize("spec", TRACKING)
def test_track_running_stats_turned_off_after_fuse(spec):
    """``bn.track_running_stats = False`` set after construction (buffers kept): PyTorch's BN then
    neither updates the running statistics nor counts the batch in training, but reads them in eval.
    Fused, the BNs updated and counted (num_batches_tracked differed); now such a BN runs unfused, and
    set back, fused again."""
    lib, name = spec.split(":")
    model = torchvision.models.__dict__[name](num_classes=10) if lib == "tv" else timm.create_model(
        name, pretrained=False, num_classes=10)
    plain, fused = _pair(model)
    bns = [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in (plain, fused):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.track_running_stats = False
    _parity(plain, fused)
    assert not any(v.startswith("fused") for v in fused_resnet.fusion_report(fused).values())
    for bn in bns:
        bn.track_running_stats = True
    report = fused_resnet.fusion_report(fused)
    assert sum(v.startswith("fused") for v in report.values()) >= len(report) - 1  # densenet's norm5

"""fuse() on timm's ``features_only`` models (detection and segmentation backbones): ``FeatureListNet``
/ ``FeatureDictNet`` wrapping a ResNet (its stem fused too, deep stem included) and
``EfficientNetFeatures`` / ``MobileNetV3Features``; every BN fused, the collected features exact (fp64
on the reference backend, train and eval and prepared), a BN whose own output is collected keeps its
activation out of the fused conv."""

import copy

import pytest
import torch
from _parity import FP64_MODEL_TOL, grad_errors, randomize_bns

import fused_resnet
from fused_resnet._tolerances import relative_error

timm = pytest.importorskip("timm")
F64 = torch.float64


def _features(model, x, train):
    model.train(train)
    torch.manual_seed(0)
    out = model(x)
    return list(out.values()) if isinstance(out, dict) else out


def _assert_same_features(plain, fused, x):
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            want, got = _features(plain, x, train), _features(fused, x, train)
            assert len(got) == len(want)
            for a, b in zip(got, want):
                assert relative_error(a, b) <= FP64_MODEL_TOL
            if train:  # a gradient through every collected feature
                sum(f.square().sum() for f in want).backward()
                sum(f.square().sum() for f in got).backward()
                errors = grad_errors(plain, fused)  # a gradient zero in exact arithmetic: vs the largest
                assert max(errors.values()) <= FP64_MODEL_TOL, max(errors, key=errors.get)
                plain.zero_grad(), fused.zero_grad()
        for (name, b), c in zip(plain.named_buffers(), fused.buffers()):
            if b.is_floating_point():
                assert relative_error(c, b) <= FP64_MODEL_TOL, name
        plain.eval()
        prepared = fused_resnet.prepare_for_inference(copy.deepcopy(fused))
        with torch.no_grad():
            for a, b in zip(prepared(x) if not isinstance(prepared(x), dict) else prepared(x).values(),
                            _features(plain, x, False)):
                assert relative_error(a, b) <= FP64_MODEL_TOL


@pytest.mark.parametrize("name, kw", [
    ("resnet18", {"out_indices": (1, 2, 3)}),
    ("resnet26d", {"out_indices": (1, 2)}),  # deep stem: Sequential(conv, BN, act, conv, BN, act, conv) -> bn1
    ("resnet18", {"out_indices": (1, 2), "feature_cls": "dict"}),
    ("efficientnet_b0", {"out_indices": (0, 2)}),
    ("mobilenetv3_small_100", {"out_indices": (1, 2)}),
])
def test_features_only_models_fuse_every_bn_and_match(name, kw):
    plain = randomize_bns(timm.create_model(name, features_only=True, **kw).to(F64))
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    report = fused_resnet.fusion_report(fused)
    assert all(state.startswith("fused") for state in report.values()), {
        k: v for k, v in report.items() if not v.startswith("fused")}
    _assert_same_features(plain, fused, torch.randn(2, 3, 64, 64, dtype=F64))


def test_a_collected_bn_output_keeps_its_activation_unfused():
    """out_indices=(0,) on a ResNet collects ``act1``'s output; a FeatureDictNet whose return layer is
    ``bn1`` itself (as ``return_layers`` allows) must return the BN's output, not the ReLU's."""
    plain = randomize_bns(timm.create_model("resnet18", features_only=True, out_indices=(0, 1)).to(F64))
    plain.return_layers = {"bn1": "0", "layer1": "1"}
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    report = fused_resnet.fusion_report(fused)
    assert report["bn1"] == "fused: into the preceding conv"  # the ReLU after it is not fused
    _assert_same_features(plain, fused, torch.randn(2, 3, 64, 64, dtype=F64))

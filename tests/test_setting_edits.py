"""Settings of a conv edited in place after ``fuse`` / ``prepare_for_inference`` (padding and dilation,
padding mode): the fused model computes what the edited unfused model does (the prepared conv's
guard sees the edit, warns and runs unprepared; a fused chain whose conv no longer pads with zeros
runs its conv, BN and activation as modules), train and eval, fp64 on the reference backend."""

import copy

import pytest
import torch
from _parity import FP64_MODEL_TOL, assert_step_matches, randomize_bns
from torch import nn

import fused_resnet
from fused_resnet._tolerances import relative_error

torchvision = pytest.importorskip("torchvision")
F64 = torch.float64


def _models():
    plain = randomize_bns(torchvision.models.resnet18(num_classes=5).to(F64)).eval()
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


def _x():
    return torch.randn(2, 3, 48, 48, dtype=F64)


def _dilate(m: nn.Module) -> None:  # the same output size, another computation
    m.layer1[0].conv1.padding, m.layer1[0].conv1.dilation = (2, 2), (2, 2)


def _reflect(m: nn.Module) -> None:
    m.conv1.padding_mode = "reflect"  # the stem, a fused conv -> BN -> ReLU chain


@pytest.mark.parametrize("edit", [_dilate, _reflect], ids=["padding+dilation", "padding_mode"])
def test_prepared_model_follows_an_edited_conv_setting(edit):
    plain, fused = _models()
    fused_resnet.prepare_for_inference(fused)
    x = _x()
    with torch.no_grad():
        assert relative_error(fused(x), plain(x)) <= FP64_MODEL_TOL
    for m in (plain, fused):
        edit(m)
    with torch.no_grad(), fused_resnet.use_backend("reference"):
        want = plain(x)
        if edit is _dilate:  # the block's prepared conv sees it
            with pytest.warns(UserWarning, match="changed since prepare_for_inference"):
                got = fused(x)
        else:  # the chain no longer fuses: its conv, BN and ReLU run as modules
            got = fused(x)
        assert relative_error(got, want) <= FP64_MODEL_TOL
        assert relative_error(fused(x), want) <= FP64_MODEL_TOL  # and stays right


@pytest.mark.parametrize("edit", [_dilate, _reflect], ids=["padding+dilation", "padding_mode"])
def test_fused_model_follows_an_edited_conv_setting_in_training(edit):
    plain, fused = _models()
    for m in (plain, fused):
        edit(m)
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(), train)
    if edit is _reflect:
        assert fused_resnet.fusion_report(fused)["bn1"].startswith("not fused")


def test_densenet_conv_padding_mode_set_after_fuse():
    """A dense layer's and a transition's conv given a reflect padding after fuse: the block / transition
    runs its own forward (the fused dense paths pad with zeros)."""
    plain = randomize_bns(torchvision.models.densenet121(num_classes=5).to(F64))
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    for m in (plain, fused):
        m.features.denseblock1.denselayer1.conv2.padding_mode = "reflect"
        m.features.transition1.conv.padding, m.features.transition1.conv.padding_mode = (1, 1), "reflect"
    x = torch.randn(2, 3, 64, 64, dtype=F64)
    with fused_resnet.use_backend("reference"):
        for train in (False, True):
            plain.train(train), fused.train(train)
            with torch.no_grad():
                assert relative_error(fused(x), plain(x)) <= FP64_MODEL_TOL

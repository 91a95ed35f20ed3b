"""fuse() on residual joins outside ResNet blocks (``_joins.py``): torchvision's MobileNetV2
``InvertedResidual`` (``x + conv(x)``) and RegNet ``ResBottleneckBlock`` (``relu(proj(x) + f(x))``, SE
inside f), timm's RegNet ``Bottleneck`` (with drop_path). Each is compared with the unfused block in fp64
(outputs, every gradient, running statistics; training and eval; prepared eval), and falls back to its
own forward when a module is replaced or hooked."""

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet._joins import FusedResidualJoin
from fused_resnet._tolerances import relative_error

from _parity import FP64_MODEL_TOL, assert_fp32_within_eager, assert_step_matches, randomize_bns

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

F64 = torch.float64


def _inverted_residual():
    from torchvision.models.mobilenetv2 import InvertedResidual

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                         InvertedResidual(8, 8, 1, 3), InvertedResidual(8, 8, 1, 1), InvertedResidual(8, 12, 2, 2))


def _tv_regnet_blocks():
    from torchvision.models.regnet import ResBottleneckBlock

    return nn.Sequential(ResBottleneckBlock(3, 8, 2, nn.BatchNorm2d, nn.ReLU, 4, 1.0, 0.25),
                         ResBottleneckBlock(8, 8, 1, nn.BatchNorm2d, nn.ReLU, 4, 1.0, 0.25),
                         ResBottleneckBlock(8, 8, 1, nn.BatchNorm2d, nn.SiLU, 4, 1.0, None))


def _timm_regnet_blocks(drop_path_rate=0.0):
    from timm.models.regnet import Bottleneck

    return nn.Sequential(Bottleneck(3, 8, 2, group_size=4, drop_path_rate=drop_path_rate),
                         Bottleneck(8, 8, 1, group_size=4, se_ratio=0.0, drop_path_rate=drop_path_rate),
                         Bottleneck(8, 8, 1, group_size=4, downsample=None, linear_out=True))


BUILDERS = {"tv_inverted_residual": (_inverted_residual, 2), "tv_res_bottleneck": (_tv_regnet_blocks, 4),
            "timm_regnet_bottleneck": (_timm_regnet_blocks, 4)}


def _pair(make):
    plain = randomize_bns(make().to(F64))
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


def _x():
    return torch.randn(2, 3, 12, 12, dtype=F64)


def _join_bns(model):
    return [k for k, v in fused_resnet.fusion_report(model).items() if v.startswith("fused: with the residual add")]


@pytest.mark.parametrize("name", BUILDERS)
def test_join_is_fused_and_matches_in_fp64(name):
    make, expected = BUILDERS[name]
    plain, fused = _pair(make)
    assert len(_join_bns(fused)) == expected, fused_resnet.fusion_report(fused)
    assert sum(isinstance(m, FusedResidualJoin) for m in fused.modules()) > 0
    assert list(fused.state_dict()) == list(plain.state_dict())
    with fused_resnet.use_backend("reference"):
        for train in (True, True, False):
            assert_step_matches(plain, fused, _x(), train)
        x = _x()
        with torch.no_grad():
            fused_resnet.prepare_for_inference(fused)
            assert relative_error(fused(x), plain.eval()(x)) <= FP64_MODEL_TOL


def test_join_applies_the_last_bn_with_the_add():
    """The last BN of a fused join is applied by bn_add_relu in training (not by a pass-through BN)."""
    plain, fused = _pair(_inverted_residual)
    calls = []
    original = fused_resnet.ops.bn_add_relu

    def spy(y, residual=None, *, relu=None, activation="relu", gate=None):
        act = fused_resnet._activation.from_flag(activation, relu)
        calls.append((isinstance(y, fused_resnet.ops.DeferredBN), residual is not None, bool(act)))
        return original(y, residual, relu=relu, activation=activation, gate=gate)

    fused_resnet._joins.ops.bn_add_relu = spy
    try:
        fused.train()(_x())
    finally:
        fused_resnet._joins.ops.bn_add_relu = original
    assert calls.count((True, True, False)) == 2  # the two InvertedResidual blocks with use_res_connect


def test_timm_drop_path_draws_as_unfused():
    """DropPath active in training: fused, its keep-scale (drawn by the module: the same draws) the
    join's gate; in eval, fused without a gate."""
    plain, fused = _pair(lambda: _timm_regnet_blocks(drop_path_rate=0.3))
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(), train)
    assert fused[0].train().fusable() and fused[0].eval().fusable()


@pytest.mark.parametrize("change", ["hook", "replace_bn"])
def test_join_falls_back_when_changed(change):
    plain, fused = _pair(_tv_regnet_blocks)
    for model in (plain, fused):
        if change == "hook":
            model[1].f.c[1].register_forward_hook(lambda m, i, o: o * 2)
        else:
            model[1].f.c[1] = nn.Identity()
    assert not fused[1].fusable() and fused[0].fusable()
    assert fused_resnet.fusion_report(fused)["0.f.c.1"].startswith("fused")
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(), train)


@pytest.mark.parametrize("edit", ["slope", "relu6_bounds"])
def test_join_activation_parameters_set_after_fuse(edit):
    """The activation after the add changed after ``fuse`` (a LeakyReLU's slope, a ReLU6's bound): the
    join no longer applies the code it was fused with; the block runs its own forward (fp64)."""
    from torchvision.models.regnet import ResBottleneckBlock

    act = nn.LeakyReLU if edit == "slope" else nn.ReLU6
    make = lambda: nn.Sequential(ResBottleneckBlock(3, 8, 2, nn.BatchNorm2d, act, 4, 1.0, None),  # noqa: E731
                                 ResBottleneckBlock(8, 8, 1, nn.BatchNorm2d, act, 4, 1.0, None))
    plain, fused = _pair(make)
    assert fused[1].fusable()
    for model in (plain, fused):
        if edit == "slope":
            model[1].activation.negative_slope = 0.2
        else:
            model[1].activation.max_val = 3.0
    assert not fused[1].fusable() and fused[0].fusable()
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(), train)


def test_join_fp32_native_within_eager_error():
    if "native" not in fused_resnet.backends():
        pytest.skip("the native extension is not built for this torch")
    plain = randomize_bns(_tv_regnet_blocks())
    fused, gold = fused_resnet.fuse(copy.deepcopy(plain)), copy.deepcopy(plain).to(F64)
    x = _x().float()
    with fused_resnet.use_backend("native"):
        assert_fp32_within_eager(plain, fused, gold, x)


def test_fused_join_compiles():
    plain, fused = _pair(_inverted_residual)
    compiled = torch.compile(fused, backend="aot_eager")
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, compiled, _x(), train)


def test_fused_join_survives_deepcopy_and_pickle():
    """A copy (an EMA model, a checkpoint) keeps the joins fused, on its own modules."""
    import io

    plain, fused = _pair(_tv_regnet_blocks)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(fused), torch.load(buffer, weights_only=False)):
        assert isinstance(copied[1], FusedResidualJoin) and copied[1].fusable()
        assert copied[1].join_last[1] is copied[1].f.c[1] and copied[1].join_last[1] is not fused[1].f.c[1]
        reference_model = copy.deepcopy(plain)
        with fused_resnet.use_backend("reference"):
            for train in (True, False):
                assert_step_matches(reference_model, copied, _x(), train)


def test_fuse_again_refuses_a_join_whose_bn_was_replaced():
    plain, fused = _pair(_tv_regnet_blocks)
    for model in (plain, fused):
        model[1].f.c[1] = randomize_bns(nn.Sequential(nn.BatchNorm2d(8))).to(F64)[0]
    fused[1].f.c[1].load_state_dict(plain[1].f.c[1].state_dict())
    assert not fused[1].fusable()
    fused_resnet.fuse(fused)
    assert fused[1].fusable() and fused[1].join_last[1] is fused[1].f.c[1]
    assert fused_resnet.fusion_report(fused)["1.f.c.1"].startswith("fused: with the residual add")
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(), train)


def test_unfuse_gives_joins_their_own_class_back():
    plain, fused = _pair(_inverted_residual)
    fused_resnet.unfuse(fused)
    assert [type(m) for m in fused.modules()] == [type(m) for m in plain.modules()]
    assert not any(k.startswith("join_") or k == "fused_join" for m in fused.modules() for k in m.__dict__)
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(), train, tol=0.0)

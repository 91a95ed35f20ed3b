"""fuse() on real torchvision and timm models (random init, small inputs): how many BatchNorms it
fuses, that each fused model computes what the unfused one does (fp64 on the reference backend:
outputs, every gradient, running statistics; fp32 on the native backend), and that the models keep
their own classes, methods and state_dict keys."""

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet._tolerances import relative_error, tolerance

from _parity import assert_step_matches, grad_errors, randomize_bns

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

F64 = torch.float64
TORCHVISION = ["resnet50", "resnext50_32x4d", "mobilenet_v2", "regnet_y_400mf"]
TIMM = ["resnet18", "resnet50", "resnet50d", "seresnet50", "resnet26t", "regnetx_002"]
MODELS = [f"tv:{n}" for n in TORCHVISION] + [f"timm:{n}" for n in TIMM]


def build(spec: str, **kw) -> nn.Module:
    lib, name = spec.split(":")
    if lib == "tv":
        return getattr(torchvision.models, name)(**kw)
    return timm.create_model(name, pretrained=False, **kw)


def fused_count(model: nn.Module) -> tuple[int, int]:
    report = fused_resnet.fusion_report(model)
    return sum(v.startswith("fused") for v in report.values()), len(report)


def _x(dtype=F64):
    return torch.randn(2, 3, 64, 64, dtype=dtype)


def _pair(spec: str, **kw) -> tuple[nn.Module, nn.Module]:
    """The model in fp64 with a non-trivial BN state, and a fused deep copy of it."""
    plain = randomize_bns(build(spec, **kw).to(F64))
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


def _train_and_eval_match(plain: nn.Module, fused: nn.Module) -> None:
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(), train)


def test_coverage_and_state_dict():
    """The issue's targets: >= 90% of these models' BatchNorms fused overall, every model >= 50%;
    parameters and buffers are the very same tensors under the same keys."""
    fused = total = 0
    for spec in MODELS:
        model = build(spec)
        before = model.state_dict(keep_vars=True)
        names = [n for n, _ in model.named_modules()]
        fused_resnet.fuse(model)
        after = model.state_dict(keep_vars=True)
        assert list(after) == list(before) and all(after[k] is before[k] for k in before), spec
        assert [n for n, _ in model.named_modules()] == names, spec
        n, of = fused_count(model)
        assert n >= 0.5 * of, f"{spec}: {n}/{of} BatchNorms fused"
        fused, total = fused + n, total + of
    assert fused >= 0.9 * total, f"{fused}/{total} BatchNorms fused"


@pytest.mark.parametrize("spec, joins", [("tv:mobilenet_v2", 10), ("tv:regnet_y_400mf", 20), ("timm:regnetx_002", 17)])
def test_residual_joins_of_real_models(spec, joins):
    """The BNs fused with their block's residual add (the last BN, and the shortcut's), by fusion_report."""
    report = fused_resnet.fusion_report(fused_resnet.fuse(build(spec)))
    assert sum(v.startswith("fused: with the residual add") for v in report.values()) == joins


@pytest.mark.parametrize("spec", ["tv:densenet121", "timm:densenet121"])
def test_densenet_blocks_and_transitions_fused(spec):
    """DenseNet (issue #16, tests/test_dense.py): dense blocks whole, transitions and the stem fused;
    only norm5 (a BN after the last block, no conv after it) is left, and the report says why."""
    model = fused_resnet.fuse(build(spec))
    report = fused_resnet.fusion_report(model)
    assert [k for k, v in report.items() if not v.startswith("fused")] == ["features.norm5"]
    assert report["features.denseblock1.denselayer1.norm1"].startswith("fused: in the dense module")
    assert report["features.transition1.norm"].startswith("fused: in the dense module")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spec", MODELS)
def test_fp64_parity_reference_backend(spec, train):
    plain, fused = _pair(spec)
    with fused_resnet.use_backend("reference"):
        for _ in range(2 if train else 1):  # a second training step sees the running statistics updated
            assert_step_matches(plain, fused, _x(), train)


@pytest.mark.parametrize("spec", ["tv:mobilenet_v2", "timm:resnet50d"])
def test_prepared_eval(spec):
    plain = randomize_bns(build(spec).to(F64)).eval()
    fused = fused_resnet.prepare_for_inference(fused_resnet.fuse(copy.deepcopy(plain)))
    x = _x()
    with fused_resnet.use_backend("reference"), torch.no_grad():
        assert relative_error(fused(x), plain(x)) <= 1e-9
    assert sum("_prepared" in m.__dict__ for m in fused.modules()) > 10


@pytest.mark.parametrize("spec", ["timm:resnet18", "tv:mobilenet_v2"])
def test_fp32_native_within_eager_error(spec):
    """fp32 on the native backend: output and gradients within 3x eager fp32's own error vs fp64."""
    if "native" not in fused_resnet.backends():
        pytest.skip("the native extension is not built for this torch")
    plain = randomize_bns(build(spec))
    fused, gold = fused_resnet.fuse(copy.deepcopy(plain)), copy.deepcopy(plain).to(F64)
    x = _x(torch.float32)
    with fused_resnet.use_backend("native"):
        outs = [m(x.to(d)) for m, d in ((plain, torch.float32), (fused, torch.float32), (gold, F64))]
    for out in outs:
        out.square().sum().backward()
    bound = 3 * relative_error(outs[0], outs[2]) + tolerance(torch.float32)
    assert relative_error(outs[1], outs[2]) <= bound
    eager, ours = grad_errors(gold, plain), grad_errors(gold, fused)
    for name, err in ours.items():
        assert err <= 3 * eager[name] + tolerance(torch.float32), name


def test_timm_extras_drop_path_dropblock_antialias():
    """DropPath / DropBlock active in training: the same random draws as unfused (with DropBlock the
    block runs its own forward; DropPath alone: tests/test_fuse_gates.py); anti-aliasing: the block is fused conv by conv, the blur pool runs as it is."""
    for kw in (dict(drop_path_rate=0.2, drop_block_rate=0.2), dict(aa_layer=nn.AvgPool2d)):
        plain, fused = _pair("timm:resnet18", **kw)
        n, of = fused_count(fused)
        assert n == of, kw
        _train_and_eval_match(plain, fused)


def test_timm_model_keeps_its_api():
    plain, fused = _pair("timm:seresnet50")
    assert type(fused) is type(plain) and isinstance(fused.layer1[0], timm.models.resnet.Bottleneck)
    assert fused.feature_info == plain.feature_info
    report = fused_resnet.fusion_report(plain)
    assert report["layer1.0.bn3"].startswith("fusable: in the residual block layer1.0")  # SE: the join's gate
    x = _x()
    with fused_resnet.use_backend("reference"):
        assert relative_error(fused.eval().forward_features(x), plain.eval().forward_features(x)) <= 1e-9
        for model in (plain, fused):
            model.reset_classifier(7)
        fused.fc.load_state_dict(plain.fc.state_dict())
        assert_step_matches(plain, fused, x, train=True)


def test_fused_timm_model_compiles():
    """Blocks fused whole, the deep stem's chains and the avg-pool downsamples, under torch.compile."""
    plain, fused = _pair("timm:resnet26t")
    _train_and_eval_match(plain, torch.compile(fused, backend="aot_eager"))


def test_timm_block_fused_whole_falls_back_when_changed():
    plain, fused = _pair("timm:resnet18")
    block = fused.layer2[0]
    assert fused_resnet.fusion_report(fused)["layer2.0.bn2"].startswith("fused: in the residual block")
    for model in (plain, fused):
        model.layer2[0].act1 = nn.SiLU()  # not the structure fuse found: the block's own forward runs
    assert not block.fusable() and block.zero_init_last is not None
    _train_and_eval_match(plain, fused)

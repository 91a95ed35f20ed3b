"""fuse() on torchvision / timm modules that no rule knows by class (res2net's, DLA's, Xception's
blocks): their forwards are traced as a user's own forward is, after the rules that know their
blocks; and a block with torchvision's children but another forward (timm's DLA blocks) is not
taken for torchvision's block. Fused models compute what the unfused ones do (fp64, reference)."""

import copy
import functools

import pytest
import torch
from _parity import assert_fp32_within_eager, assert_step_matches, randomize_bns
from torch import nn

import fused_resnet
from fused_resnet import FusedBasicBlock
from fused_resnet import _traced_forward
from fused_resnet._tolerances import relative_error
from fused_resnet._traced_forward import FusedTracedForward, run

timm = pytest.importorskip("timm")

F64 = torch.float64


def _fused_share(model: nn.Module) -> tuple[int, int]:
    report = fused_resnet.fusion_report(model)
    return sum(v.startswith("fused") for v in report.values()), len(report)


def _x(dtype=F64, size=64):
    return torch.randn(2, 3, size, size, dtype=dtype)


# (model, BNs fused before this rule): every BN of these is fused now.
ZOO = [("res2net50_26w_4s", 5), ("dla34", 7), ("xception41_small", 5)]


def _xception41_small() -> nn.Module:
    """timm's xception41 (XceptionAligned) with fewer, narrower blocks of each of its kinds: entry flow
    (stride 2, conv -> BN shortcut), middle flow (identity shortcut), exit flow (three widths, stride
    2) and the last block (no skip, not starting with a ReLU); the full model took ~250 s in fp64."""
    from timm.models.xception_aligned import XceptionAligned

    cfg = [{"in_chs": 64, "out_chs": 32, "stride": 2}, {"in_chs": 32, "out_chs": 48, "stride": 2},
           {"in_chs": 48, "out_chs": 48, "stride": 1}, {"in_chs": 48, "out_chs": (48, 64, 64), "stride": 2},
           {"in_chs": 64, "out_chs": (64, 64, 96), "stride": 1, "no_skip": True, "start_with_relu": False}]
    return XceptionAligned(block_cfg=cfg, num_classes=10, norm_layer=functools.partial(nn.BatchNorm2d, eps=.001))


@pytest.mark.parametrize("name, before", ZOO)
def test_model_zoo_forwards_fused_exactly(name, before, monkeypatch):
    model = _xception41_small() if name == "xception41_small" else timm.create_model(name, pretrained=False)
    plain = randomize_bns(model.to(F64))
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    n, of = _fused_share(fused)
    assert n == of > before, f"{name}: {n}/{of} BatchNorms fused"
    assert list(fused.state_dict()) == list(plain.state_dict())
    # Every traced module runs its plan, not its own forward (DLA's trees call DlaBasic with one or two
    # of its three arguments: each call count has its plan).
    traced = [m for m in fused.modules() if isinstance(m, FusedTracedForward)]
    runs = []
    monkeypatch.setattr(_traced_forward, "run", lambda module, *a: runs.append(module) or run(module, *a))
    with torch.no_grad():
        fused.eval()(_x())  # eval: the running statistics stay as they are for the steps below
    fused.train()
    assert traced and sorted(map(id, runs)) == sorted(map(id, traced)), f"{len(runs)} of {len(traced)} plans ran"
    monkeypatch.undo()
    with fused_resnet.use_backend("reference"):
        for train in (True, True, False):  # the second step sees the running statistics updated
            assert_step_matches(plain, fused, _x(), train)
    prepared = fused_resnet.prepare_for_inference(copy.deepcopy(fused))
    with fused_resnet.use_backend("reference"), torch.no_grad():
        x = _x()
        assert relative_error(prepared(x), plain.eval()(x)) <= 1e-9


def test_model_zoo_fp32_native_within_eager_error():
    if "native" not in fused_resnet.backends():
        pytest.skip("the native extension is not built for this torch")
    plain = randomize_bns(timm.create_model("dla34", pretrained=False))
    fused, gold = fused_resnet.fuse(copy.deepcopy(plain)), copy.deepcopy(plain).to(F64)
    with fused_resnet.use_backend("native"):
        assert_fp32_within_eager(plain, fused, gold, _x(torch.float32))


def test_known_models_keep_their_rules():
    """The rules that know a model's blocks come first: nothing of these is traced."""
    for name in ("resnet50", "seresnet50", "efficientnet_b0", "densenet121", "regnetx_002"):
        model = fused_resnet.fuse(timm.create_model(name, pretrained=False))
        traced = [n for n, m in model.named_modules() if type(m).__name__.startswith("FusedTracedForward")]
        assert not traced, f"{name}: {traced}"


class _ShortcutArgBlock(nn.Module):
    """torchvision's BasicBlock children, but the shortcut comes as an argument (as timm's DLA)."""

    takes_shortcut = True

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x, shortcut=None):
        shortcut = x if shortcut is None else shortcut
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + shortcut)


class _NoResidualBlock(_ShortcutArgBlock):
    """The same children, no residual add at all."""

    takes_shortcut = False

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class _TwoInputs(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x, x.flip(-1)) if self.block.takes_shortcut else self.block(x)


@pytest.mark.parametrize("cls", [_ShortcutArgBlock, _NoResidualBlock])
def test_block_with_torchvisions_children_and_another_forward_is_not_swapped(cls):
    torch.manual_seed(0)
    plain = randomize_bns(_TwoInputs(cls(8)).to(F64))
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    assert not isinstance(fused.block, FusedBasicBlock)
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, torch.randn(2, 8, 6, 6, dtype=F64), train)

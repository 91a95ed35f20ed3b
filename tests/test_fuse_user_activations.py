"""fuse() on user forwards whose residual add or written-out conv -> BN chain is followed by an
activation other than ReLU (``_traced_acts``): ReLU6, SiLU, Hardswish, LeakyReLU (0.01, 0.1) as
functions (positional or keyword parameters, in place or not) and as modules. The fused copy matches
the plain model (fp64 on the reference backend: outputs, every gradient, running statistics, train,
eval, prepared eval; fp32 on the native backend within eager's error); an activation the kernels do
not apply leaves the add fused without it; a module activation changed after fuse is applied as it
is now."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _parity import assert_fp64_train_eval_prepared, assert_native_fp32_train_and_eval, assert_step_matches, \
    randomize_bns
from torch import nn

import fused_resnet
from fused_resnet import _activation
from fused_resnet._traced_forward import FusedTracedForward

F64 = torch.float64

# name -> (the activation as the forward writes it, the code the join should apply; None: not applied)
ACTS = {
    "relu6": (lambda m, t: F.relu6(t), _activation.RELU6),
    "hardtanh_0_6": (lambda m, t: F.hardtanh(t, 0.0, 6.0), _activation.RELU6),
    "hardtanh_kw": (lambda m, t: F.hardtanh(t, min_val=0, max_val=6, inplace=True), _activation.RELU6),
    "silu": (lambda m, t: F.silu(t), _activation.SILU),
    "silu_inplace": (lambda m, t: F.silu(t, inplace=True), _activation.SILU),
    "hardswish": (lambda m, t: F.hardswish(t), _activation.HARDSWISH),
    "leaky_default": (lambda m, t: F.leaky_relu(t), _activation.LEAKY_RELU),
    "leaky_0_1": (lambda m, t: F.leaky_relu(t, 0.1), _activation.LEAKY_RELU_0_1),
    "leaky_kw": (lambda m, t: F.leaky_relu(t, negative_slope=0.1, inplace=True), _activation.LEAKY_RELU_0_1),
    "silu_module": (lambda m, t: m.silu(t), _activation.SILU),
    "leaky_module": (lambda m, t: m.leaky(t), _activation.LEAKY_RELU_0_1),
    "relu6_module": (lambda m, t: m.relu6(t), _activation.RELU6),
    "leaky_0_2": (lambda m, t: F.leaky_relu(t, 0.2), None),  # a slope the kernels do not apply
    "hardtanh_1": (lambda m, t: F.hardtanh(t), None),  # bounds (-1, 1)
}


class Block(nn.Module):
    """``act(bn2(conv2(act(bn1(conv1(x))))) + x)``, everything written out in the forward (the first
    activation closes a chain, the second a join), ``act`` chosen by ``kind``."""

    def __init__(self, width, kind):
        super().__init__()
        self.kind = kind
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.silu, self.leaky, self.relu6 = nn.SiLU(), nn.LeakyReLU(0.1), nn.ReLU6()

    def forward(self, x):
        act = ACTS[self.kind][0]
        out = act(self, self.bn1(self.conv1(x)))
        return act(self, self.bn2(self.conv2(out)) + x)


class Net(nn.Module):
    def __init__(self, kind, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(Block(width, kind), Block(width, kind))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _x(dtype=F64):
    return torch.randn(2, 3, 10, 10, dtype=dtype) * 2  # wide enough to cross ReLU6's 6 and Hardswish's +-3


@pytest.mark.parametrize("kind", list(ACTS))
def test_activation_after_user_add_is_fused_and_matches(kind):
    plain = randomize_bns(Net(kind).to(F64))
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    block = fused.blocks[0]
    assert isinstance(block, FusedTracedForward)
    code = ACTS[kind][1]
    join = next(j for j in block.traced_plan.joins if j.add)
    chain = next(j for j in block.traced_plan.joins if not j.add)
    assert join.act == chain.act == (code or _activation.NONE)
    report = fused_resnet.fusion_report(fused)
    assert report["blocks.0.bn2"] == "fused: with the residual add in the forward of blocks.0"
    name = _activation.LABELS[code] if code else None
    assert report["blocks.0.bn1"] == "fused: with its conv" + (f" and {name}" if name else "") + \
        " in the forward of blocks.0"
    assert_fp64_train_eval_prepared(plain, fused, _x())


@pytest.mark.parametrize("kind", ["silu", "leaky_module", "hardswish"])
def test_fp32_native_within_eager_error(kind):
    if "native" not in fused_resnet.backends():
        pytest.skip("the native extension is not built for this torch")
    assert_native_fp32_train_and_eval(randomize_bns(Net(kind)), _x(torch.float32))


def test_module_activation_changed_after_fuse_is_applied_as_it_is_now():
    """A LeakyReLU's slope set after fuse: the join would apply the old one; the block runs its own
    forward (the new slope), and again fused once the slope is back."""
    plain = randomize_bns(Net("leaky_module").to(F64))
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    for model in (plain, fused):
        model.blocks[0].leaky.negative_slope = 0.2
    assert not fused.blocks[0].fusable() and fused.blocks[1].fusable()
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(), train)
    for model in (plain, fused):
        model.blocks[0].leaky.negative_slope = 0.1
    assert fused.blocks[0].fusable()

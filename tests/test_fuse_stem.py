"""A fused stem (conv1 + bn1 + relu of a ResNet) whose modules are replaced after ``fuse`` computes
what the model now says, never the old fusion on top of the new module; ``fuse`` again re-fuses it."""

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet import models
from fused_resnet._tolerances import assert_close
from fused_resnet.distributed import FusedAwaySyncBatchNorm2d
from fused_resnet.modules import FusedAwayBatchNorm2d, FusedAwayReLU, FusedConvBN2d

F64 = torch.float64


def _models():
    torch.manual_seed(0)
    plain = models.resnet18(fused=False, num_classes=10).to(F64)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):  # a non-identity eval BN
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


def _same_outputs(fused, plain, name):
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    for training in (True, False):
        fused.train(training), plain.train(training)
        assert_close(fused(x), plain(x), F64, name=f"{name}, training={training}")


REPLACEMENTS = {
    "bn1 -> Identity": lambda m: setattr(m, "bn1", nn.Identity()),
    "bn1 -> new BatchNorm2d": lambda m: setattr(m, "bn1", nn.BatchNorm2d(64, eps=1e-3).to(F64)),
    "relu -> SiLU": lambda m: setattr(m, "relu", nn.SiLU()),
    "conv1 -> new conv": lambda m: setattr(m, "conv1", nn.Conv2d(3, 64, 7, 2, 3, bias=True).to(F64)),
}


@pytest.mark.parametrize("replace", REPLACEMENTS.values(), ids=REPLACEMENTS.keys())
def test_a_replaced_stem_module_is_obeyed(replace):
    plain, fused = _models()
    torch.manual_seed(1)
    replace(plain)
    torch.manual_seed(1)
    replace(fused)
    _same_outputs(fused, plain, "after the replacement")


def test_convert_sync_batchnorm_after_fuse_then_fuse_again():
    plain, fused = _models()
    keys = list(fused.state_dict())
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(fused)
    assert type(fused.bn1) is nn.SyncBatchNorm  # the fused-away BN was replaced by a real one
    fused.eval(), plain.eval()  # SyncBatchNorm without a process group: eval only, on the CPU
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    assert_close(fused(x), plain(x), F64, name="converted after fuse")  # not normalised twice
    assert "conv1" in fused_resnet.find_fusable(fused)
    fused_resnet.fuse(fused)
    assert isinstance(fused.conv1, FusedConvBN2d) and isinstance(fused.bn1, FusedAwaySyncBatchNorm2d)
    assert isinstance(fused.relu, FusedAwayReLU) and fused.conv1.fused_state() == (True, True)
    assert "conv1" not in fused_resnet.find_fusable(fused)
    assert list(fused.state_dict()) == keys
    _same_outputs(fused, plain, "fused again")


def test_fuse_again_restores_the_modules_left_in_place():
    plain, fused = _models()
    fused.relu = nn.ReLU(inplace=True)  # a new ReLU: BN still fused, the ReLU now runs on its own
    assert fused.conv1.fused_state() == (True, False)
    _same_outputs(fused, plain, "new ReLU")
    old_bn = fused.bn1
    fused_resnet.fuse(fused)
    assert fused.bn1 is old_bn and isinstance(old_bn, FusedAwayBatchNorm2d)
    assert fused.conv1.fused_state() == (True, True) and fused.conv1.fused_relu_module is fused.relu
    _same_outputs(fused, plain, "fused again")


def test_a_deep_copy_is_a_stem_of_its_own():
    plain, fused = _models()
    twin = copy.deepcopy(fused)
    assert twin.conv1.stem_owner is twin and twin.bn1.fused_into is twin.conv1
    twin.bn1 = nn.Identity()  # changes the copy only
    assert fused.conv1.fused_state() == (True, True)
    _same_outputs(fused, plain, "original after its copy changed")


def test_the_stem_check_compiles_without_a_graph_break():
    plain, fused = _models()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    _same_outputs(compiled, plain, "compiled")

"""unfuse(model): every module gets back its class from before fuse, with the very same tensors and
state_dict keys, and computes what the plain model computes, bit for bit (train and eval)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet import models, resnet_arch

from _parity import randomize_bns
from _tv_resnet import TVBasicBlock, tv_resnet18


def _fine_tune(model: nn.Module, x: torch.Tensor) -> None:
    """One SGD step in training (the fused model's parameters and running statistics move)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model(x).square().mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _assert_unfused_like(unfused: nn.Module, plain: nn.Module, x: torch.Tensor) -> None:
    """Same classes module by module, same keys, and the same outputs and running statistics as
    ``plain`` loaded with ``unfused``'s weights, in eval and in a training forward."""
    assert [(n, type(m)) for n, m in unfused.named_modules()] == [(n, type(m)) for n, m in plain.named_modules()]
    assert not any(fused_resnet.fx.is_fused(m) for m in unfused.modules())
    plain.load_state_dict(unfused.state_dict())
    for mode in (False, True):
        unfused.train(mode), plain.train(mode)
        with torch.no_grad():
            torch.manual_seed(1)  # the same dropout masks
            got = unfused(x)
            torch.manual_seed(1)
            assert torch.equal(got, plain(x)), f"train={mode}"
    for (name, a), b in zip(unfused.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name


def test_unfuse_after_fine_tuning_fused_is_the_plain_model_with_the_same_tensors():
    torch.manual_seed(0)
    plain = randomize_bns(tv_resnet18(num_classes=10))
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    x = torch.randn(2, 3, 32, 32)
    _fine_tune(fused, x)
    fused_resnet.prepare_for_inference(fused)
    tensors = {k: v for k, v in fused.state_dict(keep_vars=True).items()}
    objects = dict(fused.named_modules())
    unfused = fused_resnet.unfuse(fused)
    assert unfused is fused
    assert all(objects[n] is m for n, m in unfused.named_modules()), "unfuse keeps every module object"
    assert all(v is tensors[k] for k, v in unfused.state_dict(keep_vars=True).items())
    assert not any("_prepared" in m.__dict__ or "class_before_fuse" in m.__dict__ for m in unfused.modules())
    _assert_unfused_like(unfused, copy.deepcopy(plain), x)


def test_unfuse_a_model_built_fused_gives_the_plain_architecture():
    torch.manual_seed(0)
    fused = randomize_bns(models.resnet50(num_classes=10))
    unfused = fused_resnet.unfuse(fused)
    assert type(unfused.layer1[0]) is resnet_arch.Bottleneck
    _assert_unfused_like(unfused, models.resnet50(fused=False, num_classes=10), torch.randn(2, 3, 32, 32))


def test_unfuse_a_block_and_its_hooks_stay_removable():
    torch.manual_seed(0)
    block = TVBasicBlock(8, 8)
    fused = fused_resnet.fuse(copy.deepcopy(block))
    seen = []
    handle = fused.register_forward_hook(lambda m, i, o: seen.append(o))
    unfused = fused_resnet.unfuse(fused)
    assert type(unfused) is TVBasicBlock
    x = torch.randn(2, 8, 6, 6)
    _assert_unfused_like(unfused, copy.deepcopy(block), x)
    assert len(seen) == 2  # eval and train forwards
    handle.remove()
    unfused(x)
    assert len(seen) == 2


def test_unfuse_of_a_plain_model_changes_nothing_and_fuse_again_works():
    torch.manual_seed(0)
    plain = randomize_bns(tv_resnet18(num_classes=10)).eval()
    model = copy.deepcopy(plain)
    assert fused_resnet.unfuse(model) is model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        fused_resnet.unfuse(fused_resnet.fuse(model))
        refused = fused_resnet.fuse(model)
        assert isinstance(refused.layer1[0], fused_resnet.FusedBasicBlock)
        assert isinstance(refused.conv1, fused_resnet.modules.FusedConvBN2d)
        fused_resnet._tolerances.assert_close(refused(x), plain(x), torch.float32, name="fused again")


@pytest.mark.parametrize("spec", ["tv:resnet18", "tv:mobilenet_v2", "tv:densenet121", "timm:resnet18",
                                  "timm:regnetx_002", "timm:densenet121"])
def test_unfuse_real_models_restores_their_classes(spec):
    library, name = spec.split(":")
    lib = pytest.importorskip("torchvision" if library == "tv" else "timm")
    torch.manual_seed(0)
    plain = getattr(lib.models, name)(num_classes=10) if library == "tv" else lib.create_model(
        name, pretrained=False, num_classes=10)
    plain = randomize_bns(plain)
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    assert any(fused_resnet.fx.is_fused(m) for m in fused.modules())
    # At 32px DenseNet's last block and RegNet's last stage see 1x1 maps: with batch 2 the running
    # variance after one step is tiny and eval blows up (unfused too).
    size = 64 if "densenet" in name or "regnet" in name else 32
    x = torch.randn(2, 3, size, size)
    _fine_tune(fused, x)
    _assert_unfused_like(fused_resnet.unfuse(fused), copy.deepcopy(plain), x)

"""Hooks on fused models. A hook registered after fuse on a module of a fused conv -> BN (-> ReLU)
chain (forward, forward pre-, full backward, backward pre-) makes that chain run unfused while it
is there, so it sees what it would on the unfused model; removed, the chain is fused again (the
residual blocks do the same: tests/test_fuse.py). Global module hooks see the modules that run: the
blocks, the stages, and not the modules inside a fused block; fused_resnet warns once that they do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet import models
from fused_resnet._tolerances import assert_close

TOL = 1e-9  # fused vs unfused in fp64


def _chain_pair():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()).double()
    with torch.no_grad():
        for bn in (plain[1], plain[4]):
            bn.running_mean.normal_(0, 0.2), bn.running_var.uniform_(0.5, 2.0), bn.bias.normal_(0, 0.5)
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    assert isinstance(fused[0], fused_resnet.modules.FusedConvBN2d) and fused[0].fused_state() == (True, True)
    return plain.eval(), fused.eval()


def _register(module: nn.Module, kind: str, seen: list):
    keep = seen.append
    if kind == "forward":
        return module.register_forward_hook(lambda m, args, out: keep(out.detach().clone()))
    if kind == "forward_pre":
        return module.register_forward_pre_hook(lambda m, args: keep(args[0].detach().clone()))
    if kind == "full_backward":
        return module.register_full_backward_hook(lambda m, gin, gout: keep(gout[0].clone()))
    return module.register_full_backward_pre_hook(lambda m, gout: keep(gout[0].clone()))


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward", "full_backward_pre"])
@pytest.mark.parametrize("index", [0, 1, 2], ids=["conv", "bn", "relu"])
def test_a_hook_on_a_chain_module_sees_the_unfused_values_and_its_removal_fuses_again(index, kind):
    plain, fused = _chain_pair()
    seen_plain, seen_fused = [], []
    _register(plain[index], kind, seen_plain)
    handle = _register(fused[index], kind, seen_fused)
    assert fused[0].fused_state() == ((True, False) if index == 2 else (False, False))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    out_plain, out_fused = plain(x), fused(x)
    assert_close(out_fused, out_plain, tol=TOL, name="output")
    out_plain.square().sum().backward(), out_fused.square().sum().backward()
    assert len(seen_fused) == len(seen_plain) == 1
    assert_close(seen_fused[0], seen_plain[0], tol=TOL, name=f"what the {kind} hook saw")
    handle.remove()
    assert fused[0].fused_state() == (True, True)
    with torch.no_grad(), fused_resnet.trace_dispatch() as log:
        assert_close(fused(x), plain(x), tol=TOL, name="output fused again")
    assert [k for k, _ in log].count("conv_bias_act") == 2


def test_global_hooks_see_the_blocks_and_stages_not_the_modules_inside_fused_blocks(monkeypatch):
    torch.manual_seed(0)
    plain = models.resnet18(fused=False, num_classes=10).double().eval()
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    names = {m: n for model in (plain, fused) for n, m in model.named_modules()}
    seen: dict[str, list] = {"plain": {}, "fused": {}}

    def hook(module, args, output):
        if module in names and isinstance(output, torch.Tensor):
            which = "fused" if any(module is m for m in fused.modules()) else "plain"
            seen[which][names[module]] = output.detach().clone()

    handle = nn.modules.module.register_module_forward_hook(hook)
    monkeypatch.setattr(fused_resnet.modules, "_warned", {})
    try:
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        with torch.no_grad(), pytest.warns(UserWarning, match="global module hooks are registered") as caught:
            assert_close(fused(x), plain(x), tol=TOL)
    finally:
        handle.remove()
    assert len([w for w in caught if "global module hooks" in str(w.message)]) == 1  # once
    assert {"layer1", "layer2.0", "layer4.1", "fc"} <= set(seen["fused"])
    assert "layer2.0.bn1" in seen["plain"] and "layer2.0.bn1" not in seen["fused"]
    for name in ("layer1", "layer2.0", "layer4.1", "fc"):
        assert_close(seen["fused"][name], seen["plain"][name], tol=TOL, name=name)

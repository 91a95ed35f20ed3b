"""fuse(model) on torchvision-structured models: identical outputs, gradients and running statistics."""

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet import FusedBasicBlock, FusedBottleneck
from fused_resnet._tolerances import assert_close, relative_error, tolerance
from fused_resnet.modules import FusedAwayBatchNorm2d, FusedConvBN2d

from _tv_resnet import TVBasicBlock, TVBottleneck, TVResNet, tv_resnet18, tv_resnet50

FP64_MODEL_TOL = 1e-9  # the bar for whole fused models in fp64


def _pair(ctor, dtype=torch.float64, memory_format=torch.contiguous_format, **kw):
    plain = ctor(**kw).to(dtype=dtype, memory_format=memory_format)
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


def _compare_step(plain, fused, x, tol, steps=1):
    """Run ``steps`` SGD steps on both and compare outputs, every gradient and every buffer."""
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        out_p, out_f = plain(x), fused(x)
        assert_close(out_f, out_p, tol=tol, name="output")
        (out_p.square().sum()).backward()
        (out_f.square().sum()).backward()
        for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
            if p.grad is None:
                assert q.grad is None, name
                continue
            assert_close(q.grad, p.grad, tol=tol, name=f"grad {name}")
        opt_p.step(), opt_f.step()
        opt_p.zero_grad(), opt_f.zero_grad()
    for (name, b), c in zip(plain.named_buffers(), fused.buffers()):
        if b.is_floating_point():
            assert_close(c, b, tol=tol, name=name)
        else:
            assert torch.equal(c, b), name


@pytest.mark.parametrize("ctor", [tv_resnet18, tv_resnet50], ids=["resnet18", "resnet50"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_model_matches_fp64(ctor, train):
    plain, fused = _pair(ctor, width=8)
    assert fused_resnet.find_fusable(fused) == []
    plain.train(train), fused.train(train)
    x = torch.randn(3, 3, 64, 48, dtype=torch.float64)
    _compare_step(plain, fused, x, FP64_MODEL_TOL, steps=2)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_fused_model_matches_fp32(memory_format):
    """Two SGD steps in fp32, each started from one common state: the fused model's gradients
    are within twice eager fp32's own error (vs an fp64 oracle) plus the fp32 tolerance. Each
    run carrying its own fp32 state is ill-posed: ~5e-6 state error flips ReLU decisions of
    pre-activations within ~1e-5 of 0, moving a BN bias gradient by ~1% in any implementation."""
    plain = tv_resnet18(width=8).to(memory_format=memory_format)
    fused, gold = fused_resnet.fuse(copy.deepcopy(plain)), copy.deepcopy(plain).double()
    x = torch.randn(4, 3, 40, 40).to(memory_format=memory_format)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, fused, gold)]
    for _ in range(2):
        state = plain.state_dict()
        fused.load_state_dict(state)
        gold.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
        outs = [m(x.to(dtype)) for m, dtype in ((plain, torch.float32), (fused, torch.float32), (gold, torch.float64))]
        assert_close(outs[1], outs[2], tol=2 * relative_error(outs[0], outs[2]) + tolerance(torch.float32), name="output")
        for out in outs:
            out.square().sum().backward()
        for (name, p), q, g in zip(plain.named_parameters(), fused.parameters(), gold.parameters()):
            err = relative_error(p.grad, g.grad)
            assert_close(q.grad, g.grad, tol=2 * err + tolerance(torch.float32), name=f"grad {name}")
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for (name, b), c in zip(plain.named_buffers(), fused.buffers()):
        if b.is_floating_point():
            assert_close(c, b, tol=1e-4, name=name)
        else:
            assert torch.equal(c, b), name


def test_fuse_swaps_blocks_and_stem_keeping_tensors():
    plain = tv_resnet50(width=8)
    before = {k: v for k, v in plain.state_dict(keep_vars=True).items()}
    names = fused_resnet.find_fusable(plain)
    assert len(names) == 3 + 4 + 6 + 3 + 1
    fused_resnet.fuse(plain)
    after = plain.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)  # the very same tensors
    assert isinstance(plain.layer1[0], FusedBottleneck)
    assert isinstance(plain.conv1, FusedConvBN2d) and isinstance(plain.bn1, FusedAwayBatchNorm2d)
    assert type(plain.relu) is nn.ReLU  # unknown forward: the stem ReLU stays
    assert fused_resnet.find_fusable(plain) == []


def test_fuse_known_resnet_forward_fuses_stem_relu():
    model = fused_resnet.models.resnet18(fused=False, num_classes=5)
    fused_resnet.fuse(model)
    assert model.conv1.fused_relu and type(model.relu) is not nn.ReLU


def test_fuse_leaves_unrecognised_modules_alone():
    class PreAct(nn.Module):  # same child names, pre-activation order: bn1 sees the block input
        def __init__(self):
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1, bias=False)
            self.bn2, self.conv2 = nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3, padding=1, bias=False)
            self.relu = nn.ReLU()

    model = nn.Sequential(
        PreAct(),
        TVBasicBlock(8, 8, norm_layer=lambda c: nn.GroupNorm(2, c)),
        # a reflect-padded conv (a biased one fuses: tests/test_fuse_conv_bias.py)
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8), nn.ReLU()),
    )
    kinds = [type(m) for m in model.modules()]
    fused_resnet.fuse(model)
    assert [type(m) for m in model.modules()] == kinds


def test_fuse_users_own_block_copy_and_top_level_block():
    block = TVBottleneck(16, 4)  # no downsample needed: 16 -> 16 channels
    fused = fused_resnet.fuse(block)
    assert isinstance(fused, FusedBottleneck) and fused.conv1 is block.conv1
    x = torch.randn(2, 16, 9, 9)
    assert_close(fused(x), block(x), name="block")


def test_fuse_verbose_reports(capsys):
    fused_resnet.fuse(tv_resnet18(width=8), verbose=True)
    assert "swapped 9 module(s)" in capsys.readouterr().out


@pytest.mark.parametrize("groups, width_per_group", [(4, 16), (1, 128)], ids=["resnext", "wide"])
def test_fuse_grouped_and_wide_bottlenecks(groups, width_per_group):
    plain, fused = _pair(TVResNet, block=TVBottleneck, layers=[1, 1, 1, 1], width=8, groups=groups,
                         width_per_group=width_per_group)
    assert isinstance(fused.layer1[0], FusedBottleneck)
    _compare_step(plain, fused, torch.randn(2, 3, 32, 32, dtype=torch.float64), FP64_MODEL_TOL)


def test_state_dict_round_trip_both_ways():
    tv = tv_resnet18(num_classes=7, width=64)
    ours = fused_resnet.resnet18(num_classes=7)
    assert list(ours.state_dict()) == list(tv.state_dict())
    ours.load_state_dict(tv.state_dict())
    back = tv_resnet18(num_classes=7, width=64)
    back.load_state_dict(ours.state_dict())
    for k, v in tv.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert isinstance(ours.layer1[0], FusedBasicBlock)
    ours50, tv50 = fused_resnet.resnet50(), tv_resnet50(num_classes=1000)
    assert {k: v.shape for k, v in ours50.state_dict().items()} == {k: v.shape for k, v in tv50.state_dict().items()}


def test_prepared_eval_folds_once_and_follows_parameter_changes(monkeypatch):
    """Unprepared, eval folds on every call (nothing cached); prepare_for_inference folds once; an
    in-place change after it is seen (a warning, then unprepared and right); load_state_dict drops it."""
    plain, fused = _pair(tv_resnet18, width=8)
    plain.eval(), fused.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    calls = []
    original = fused_resnet.ops.fold_bn
    monkeypatch.setattr(fused_resnet.ops, "fold_bn", lambda *a: calls.append(1) or original(*a))
    convs = sum(isinstance(m, nn.Conv2d) for m in plain.modules())
    with torch.no_grad():
        assert_close(fused(x), plain(x), tol=FP64_MODEL_TOL)
        assert len(calls) == convs
        fused_resnet.prepare_for_inference(fused)
        assert len(calls) == 2 * convs
        assert_close(fused(x), plain(x), tol=FP64_MODEL_TOL)
        assert len(calls) == 2 * convs  # every fold came from the preparation
        for model in (plain, fused):  # in place, behind the model's back
            model.layer1[0].bn1.weight.mul_(1.5)
            model.layer2[0].conv1.weight.add_(0.01)
            model.layer3[0].bn2.running_var.mul_(2.0)
        with pytest.warns(UserWarning, match="prepare_for_inference"):
            assert_close(fused(x), plain(x), tol=FP64_MODEL_TOL)
        fused_resnet.prepare_for_inference(fused)
        fused.load_state_dict(tv_resnet18(width=8).double().state_dict())
        plain.load_state_dict(fused.state_dict())
        assert_close(fused(x), plain(x), tol=FP64_MODEL_TOL)


def test_a_hook_registered_after_fuse_fires_as_unfused_and_its_removal_fuses_again():
    """Forward hooks on the modules inside a fused block (feature extraction, debugging): while one
    is registered the block runs its own forward, so the hook sees what it would unfused; removed,
    the block is fused again. Hooks on blocks and stages fire either way."""
    plain, fused = _pair(tv_resnet18, width=8)
    plain.eval(), fused.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    seen = {}

    def keep(name):
        return lambda module, inputs, output: seen.__setitem__(name, output.detach().clone())

    handles = [fused.layer2[0].bn1.register_forward_hook(keep("fused bn1")),
               plain.layer2[0].bn1.register_forward_hook(keep("plain bn1")),
               fused.layer3.register_forward_hook(keep("fused layer3")),
               plain.layer3.register_forward_hook(keep("plain layer3"))]
    with torch.no_grad(), fused_resnet.trace_dispatch() as log:
        assert_close(fused(x), plain(x), tol=FP64_MODEL_TOL)
    assert_close(seen["fused bn1"], seen["plain bn1"], tol=FP64_MODEL_TOL, name="hooked BN's output")
    assert_close(seen["fused layer3"], seen["plain layer3"], tol=FP64_MODEL_TOL, name="stage output")
    hooked_convs = sum(k == "conv_bias_act" for k, _ in log)
    for handle in handles:
        handle.remove()
    with torch.no_grad(), fused_resnet.trace_dispatch() as log:
        assert_close(fused(x), plain(x), tol=FP64_MODEL_TOL)
    assert sum(k == "conv_bias_act" for k, _ in log) == hooked_convs + 3  # layer2[0]: conv1, conv2, downsample

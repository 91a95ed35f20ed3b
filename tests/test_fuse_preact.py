"""Pre-activation blocks (timm's ResNetV2 ``PreActBottleneck`` / ``PreActBasic``) fused whole
(``fused_resnet._preact``): coverage on the real models, fp64 parity with the unfused model (outputs,
every gradient, running statistics over several training steps, then eval, inference mode and
prepared), fp32 within eager's own error, state_dict and classes kept, unfuse, hooks, changed blocks,
and the functional pieces (``ops.batch_norm_deferred``, ``ops.conv``) against ATen with gradcheck."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from fused_resnet import _patterns, _preact, ops
from fused_resnet._tolerances import relative_error

from _parity import assert_fp32_within_eager, assert_step_matches, randomize_bns

try:  # the hand-written pre-activation ResNet (end of file) needs no timm
    import timm
    from timm.models import resnetv2
except ImportError:
    timm = resnetv2 = None
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed")

F64 = torch.float64
TOL = 1e-9
# Small and fast: one block a stage, few channels (timm's own kwargs).
SMALL = dict(layers=[1, 1, 1, 1], stem_chs=16, channels=(32, 48, 64, 96), num_classes=5)


def _build(name: str, **kw) -> nn.Module:
    small = dict(SMALL, **kw)
    if name == "resnetv2_18":
        small["layers"] = [2, 1, 1, 1]  # a block without downsample (identity shortcut) too
    return timm.create_model(name, pretrained=False, **small)


def _pair(name: str, **kw) -> tuple[nn.Module, nn.Module]:
    plain = randomize_bns(_build(name, **kw).to(F64))
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


def _x(dtype=F64, n=3):
    return torch.randn(n, 3, 32, 32, dtype=dtype)


def _spy(monkeypatch) -> list:
    """Counts the fused blocks' runs (each calls ops.batch_norm_deferred once for its norm1)."""
    calls, real = [], ops.batch_norm_deferred
    monkeypatch.setattr(ops, "batch_norm_deferred", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@needs_timm
@pytest.mark.parametrize("name, fused, total", [("resnetv2_50", 48, 49), ("resnetv2_18", 16, 17),
                                                ("resnetv2_50d", 50, 51)])
def test_real_models_coverage_and_state_dict(name, fused, total):
    """Every BN of every pre-activation block fused; the final norm (before the head) is not, with its reason;
    parameters and buffers are the very same tensors under the same keys, module names unchanged."""
    model = timm.create_model(name, pretrained=False)
    before, names = model.state_dict(keep_vars=True), [n for n, _ in model.named_modules()]
    assert all(v.startswith("fusable") for k, v in fused_resnet.fusion_report(model).items() if k != "norm")
    fused_resnet.fuse(model)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert [n for n, _ in model.named_modules()] == names
    report = fused_resnet.fusion_report(model)
    assert len(report) == total and sum(v.startswith("fused") for v in report.values()) == fused
    assert report["stages.0.blocks.0.norm1"] == "fused: in the residual block stages.0.blocks.0"
    assert report["norm"].startswith("not fused: the pre-activation model's final BN + act")
    assert isinstance(model.stages[0].blocks[0], (resnetv2.PreActBottleneck, resnetv2.PreActBasic))
    assert "stages.1.blocks.0" not in fused_resnet.find_fusable(model)  # fused already
    assert "stages.1.blocks.0" in fused_resnet.find_fusable(timm.create_model(name, pretrained=False))


@needs_timm
@pytest.mark.parametrize("name, kw", [("resnetv2_50", {}), ("resnetv2_18", {}),
                                      ("resnetv2_50d", dict(drop_path_rate=0.2)),  # DownsampleAvg; DropPath drops
                                      ("resnetv2_50", dict(momentum=None))],
                         ids=["50", "18", "50d-droppath", "50-momentum-none"])
def test_fp64_parity_train_steps_then_eval_and_prepared(name, kw, monkeypatch):
    momentum_none = kw.pop("momentum", 0.1) is None
    plain, fused = _pair(name, **kw)
    if momentum_none:  # cumulative average of the running statistics (num_batches_tracked)
        for model in (plain, fused):
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = None
    calls = _spy(monkeypatch)
    with fused_resnet.use_backend("reference"):
        for _ in range(3):  # later steps see the running statistics updated by the earlier ones
            assert_step_matches(plain, fused, _x(), train=True)
        assert len(calls) == 3 * sum(isinstance(m, _preact.FusedPreActBlock) for m in fused.modules()) > 0
        assert_step_matches(plain, fused, _x(), train=False)
        plain.eval(), fused.eval()
        x = _x()
        with torch.no_grad():
            assert relative_error(fused(x), plain(x)) <= TOL
        with torch.inference_mode():
            assert relative_error(fused(x), plain(x)) <= TOL
        fused_resnet.prepare_for_inference(fused)
        assert sum("_prepared" in m.__dict__ for m in fused.modules() if isinstance(m, _preact.FusedPreActBlock)) >= 4
        with torch.inference_mode():
            assert relative_error(fused(x), plain(x)) <= TOL


@needs_timm
@pytest.mark.parametrize("name", ["resnetv2_50", "resnetv2_18"])
def test_fp32_within_eager_error(name):
    """fp32 on the default backend, training: output and every gradient within 3x eager fp32's error vs fp64."""
    plain = randomize_bns(_build(name))
    fused, gold = fused_resnet.fuse(copy.deepcopy(plain)), copy.deepcopy(plain).to(F64)
    assert_fp32_within_eager(plain, fused, gold, _x(torch.float32, n=4))


@needs_timm
def test_unfuse_gives_back_the_plain_blocks():
    plain, fused = _pair("resnetv2_50")
    with fused_resnet.use_backend("reference"):
        assert_step_matches(plain, fused, _x(), train=True)
    fused_resnet.unfuse(fused)
    assert not any(isinstance(m, _preact.FusedPreActBlock) for m in fused.modules())
    assert type(fused.stages[0].blocks[0]) is resnetv2.PreActBottleneck
    x = _x()
    plain.load_state_dict(fused.state_dict())  # the running statistics differ by rounding after the step
    plain.eval(), fused.eval()
    assert torch.equal(fused(x), plain(x))  # the plain model itself, with the same tensors
    fused_resnet.fuse(fused)
    assert isinstance(fused.stages[0].blocks[0], _preact.FusedPreActBlock)


@needs_timm
@pytest.mark.parametrize("where", ["norm2", "conv3", "norm1.act", "downsample.conv"])
def test_a_hook_makes_the_block_run_unfused_and_its_removal_fuses_again(where):
    plain, fused = _pair("resnetv2_50")
    block = fused.stages[1].blocks[0]
    seen_plain, seen_fused = [], []
    plain.stages[1].blocks[0].get_submodule(where).register_forward_hook(lambda m, a, o: seen_plain.append(o.clone()))
    handle = block.get_submodule(where).register_forward_hook(lambda m, a, o: seen_fused.append(o.clone()))
    if where != "downsample.conv":  # the downsample runs as its own module, the rest of the block stays fused
        assert not block.fusable()
        assert fused_resnet.fusion_report(fused)["stages.1.blocks.0.norm2"].startswith("not fused")
    with fused_resnet.use_backend("reference"):
        assert_step_matches(plain, fused, _x(), train=True)
        assert len(seen_fused) == len(seen_plain) == 1
        assert relative_error(seen_fused[0], seen_plain[0]) <= TOL
        handle.remove()
        assert block.fusable()
        plain.stages[1].blocks[0].get_submodule(where)._forward_hooks.clear()
        assert_step_matches(plain, fused, _x(), train=True)


@needs_timm
def test_a_block_changed_after_fuse_runs_its_own_forward():
    plain, fused = _pair("resnetv2_18")
    block = fused.stages[0].blocks[0]
    for model in (plain, fused):
        model.stages[0].blocks[0].norm2.act = nn.GELU()  # an activation the kernels do not apply
    assert not block.fusable()
    with fused_resnet.use_backend("reference"):
        assert_step_matches(plain, fused, _x(), train=True)
        assert_step_matches(plain, fused, _x(), train=False)


@needs_timm
def test_bit_models_are_not_fused_and_say_why():
    """BiT (GroupNormAct + StdConv2d): a conv prologue needs a per-channel scale/shift."""
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False)
    block = model.stages[0].blocks[0]
    names = _patterns.preact_block(block)
    assert "StdConv2d" in _patterns.why_not_preact(block, names)
    assert not any(n.startswith("stages") for n in fused_resnet.find_fusable(model))
    fused_resnet.fuse(model)
    assert not any(isinstance(m, _preact.FusedPreActBlock) for m in model.modules())


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_batch_norm_deferred_and_conv_match_aten(act):
    """conv(act(bn(x))) by ops.batch_norm_deferred + ops.conv vs F.batch_norm / F.conv2d: forward,
    running statistics and gradcheck in fp64."""
    x = torch.randn(3, 4, 6, 6, dtype=F64, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, dtype=F64, requires_grad=True)
    g = torch.rand(4, dtype=F64).add(0.5).requires_grad_()
    b = torch.randn(4, dtype=F64, requires_grad=True)
    fn = {"relu": F.relu, "silu": F.silu}[act]

    def fused(x, w, g, b, rm=None, rv=None, nbt=None):
        d = ops.batch_norm_deferred(x, g, b, rm, rv, nbt, momentum=0.1, eps=1e-5)
        return ops.conv(d, w, padding=1, in_activation=act)

    def eager(x, w, g, b, rm=None, rv=None):
        return F.conv2d(fn(F.batch_norm(x, rm, rv, g, b, True, 0.1, 1e-5)), w, padding=1)

    rm, rv = torch.randn(4, dtype=F64), torch.rand(4, dtype=F64) + 0.5
    rm2, rv2, nbt = rm.clone(), rv.clone(), torch.zeros((), dtype=torch.long)
    with fused_resnet.use_backend("reference"):
        assert relative_error(fused(x, w, g, b, rm2, rv2, nbt), eager(x, w, g, b, rm, rv)) <= TOL
        assert relative_error(rm2, rm) <= TOL and relative_error(rv2, rv) <= TOL and int(nbt) == 1
        assert torch.autograd.gradcheck(fused, (x, w, g, b))
        evald = ops.batch_norm_deferred(x, g, b, rm, rv, training=False)
        ref = F.batch_norm(x, rm, rv, g, b, False, 0.1, 1e-5)
        assert relative_error(evald.y * evald.scale.view(-1, 1, 1) + evald.shift.view(-1, 1, 1), ref) <= TOL


@needs_timm
def test_native_channels_last_and_compile():
    """fp64 on the default (native when built) backend in channels_last, and under torch.compile
    (aot_eager: the fused ops traced in training; eval runs the block's own forward, ATen)."""
    plain, fused = _pair("resnetv2_50d")
    x = _x().to(memory_format=torch.channels_last)
    assert_step_matches(plain, fused, x, train=True)
    compiled = torch.compile(fused, backend="aot_eager")
    with fused_resnet.use_backend("reference"):
        assert_step_matches(plain, compiled, _x(), train=True)
        assert_step_matches(plain, compiled, _x(), train=False)


# A hand-written pre-activation ResNet (the common CIFAR PreActBlock): fused through its traced forward.


class PreActBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class PreActResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.layer1 = nn.Sequential(PreActBlock(8, 8), PreActBlock(8, 8))
        self.layer2 = nn.Sequential(PreActBlock(8, 16, 2))
        self.bn = nn.BatchNorm2d(16)
        self.linear = nn.Linear(16, 10)

    def forward(self, x):
        out = F.relu(self.bn(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _cifar_pair():
    torch.manual_seed(0)
    plain = randomize_bns(PreActResNet().to(F64))
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


def _cx(dtype=F64):
    return torch.randn(4, 3, 8, 8, dtype=dtype)


def test_hand_written_preact_block_conv_bn_relu_conv_link_in_the_prologue(monkeypatch):
    """conv1 -> bn2 -> relu -> conv2: bn2 and the ReLU applied in conv2's prologue in training (ops.conv
    runs once a block and step), folded in eval; bn1 (no conv before it) says why it is not fused."""
    plain, fused = _cifar_pair()
    report = fused_resnet.fusion_report(fused)
    assert report["layer1.0.bn2"] == "fused: with its conv and ReLU in the forward of layer1.0"
    assert report["layer1.0.bn1"].startswith("not fused: its input is not a conv's output")
    assert [s[0] for s in fused.layer1[0].traced_plan.steps].count("conv_in") == 1
    calls, real = [], ops.conv
    monkeypatch.setattr(ops, "conv", lambda *a, **k: calls.append(1) or real(*a, **k))
    with fused_resnet.use_backend("reference"):
        for _ in range(2):
            assert_step_matches(plain, fused, _cx(), train=True)
        assert len(calls) == 2 * 3
        assert_step_matches(plain, fused, _cx(), train=False)
        plain.eval(), fused.eval()
        x = _cx()
        with torch.inference_mode():
            assert relative_error(fused(x), plain(x)) <= TOL
            fused_resnet.prepare_for_inference(fused)
            assert relative_error(fused(x), plain(x)) <= TOL
    assert len(calls) == 2 * 3  # eval: folded, no prologue


def test_hand_written_preact_fp32_hooks_and_unfuse():
    plain, fused = _cifar_pair()
    plain32, fused32 = copy.deepcopy(plain).float(), copy.deepcopy(fused).float()
    assert all(block.fusable() for block in (*fused32.layer1, *fused32.layer2))
    assert_fp32_within_eager(plain32, fused32, copy.deepcopy(plain), _cx(torch.float32))
    seen_plain, seen_fused = [], []
    plain.layer1[1].conv2.register_forward_hook(lambda m, a, o: seen_plain.append(a[0].clone()))
    handle = fused.layer1[1].conv2.register_forward_hook(lambda m, a, o: seen_fused.append(a[0].clone()))
    assert not fused.layer1[1].fusable()  # the hook sees conv2's real input: the block runs its own forward
    with fused_resnet.use_backend("reference"):
        assert_step_matches(plain, fused, _cx(), train=True)
    assert len(seen_fused) == 1 and relative_error(seen_fused[0], seen_plain[0]) <= TOL
    handle.remove()
    assert fused.layer1[1].fusable()
    fused_resnet.unfuse(fused)
    assert type(fused.layer1[0]) is PreActBlock
    plain.load_state_dict(fused.state_dict())
    x = _cx()
    assert torch.equal(fused.eval()(x), plain.eval()(x))

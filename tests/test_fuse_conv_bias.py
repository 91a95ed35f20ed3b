"""fuse() of conv(bias=True) -> BatchNorm chains and blocks (issue #13): the BN absorbs the conv's bias.

In training ``bn(conv(x) + b) == bn(conv(x))`` (the batch mean takes ``b`` away) while the running mean
is updated with the batch mean of ``conv(x) + b``; in eval the BN folds with ``running_mean - b``. The
bias's gradient is exactly zero in training: the fused one is a zero tensor (not None, so that weight
decay and momentum move it as unfused). Checked on a user model written with biased convs (a chain and
residual blocks, the add in the model's forward), in fp64 against the unfused model (outputs, every
gradient, running statistics, several steps, eval, prepared eval), fp32 within eager's error, BN
variants (momentum=None, no running statistics, no affine), an optimizer with weight decay, the
prepared state's guard, unfuse, real timm models, the functional op (gradcheck) and torch.export;
torch.compile (inductor) in tests/test_compile_inductor.py, synchronised BN in tests/test_distributed.py."""

from __future__ import annotations

import copy

import pytest
import torch
from _parity import FP64_MODEL_TOL, assert_native_fp32_train_and_eval, randomize_bns, step_errors
from torch import nn

import fused_resnet
from fused_resnet._tolerances import relative_error
from fused_resnet.inference import Preparable
from fused_resnet.modules import FusedConvBN2d

F64 = torch.float64


class UserBlock(nn.Module):
    """A residual block as users write it: biased convs (nn.Conv2d's default), the add in forward."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.a, self.na = nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout)
        self.b, self.nb = nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = torch.relu(self.na(self.a(x)))
        return torch.relu(self.nb(self.b(h)) + (x if self.proj is None else self.proj(x)))


class TvLikeBlock(nn.Module):
    """torchvision's BasicBlock children and data flow, with biased convs."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.downsample = None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class UserNet(nn.Module):
    def __init__(self, bn=nn.BatchNorm2d):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), bn(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), bn(8), nn.SiLU())
        self.block1 = TvLikeBlock(8)
        self.block2 = UserBlock(8, 16, stride=2)
        self.block3 = UserBlock(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.head(x.mean((2, 3)))


def _randomize_conv_biases(model: nn.Module) -> nn.Module:
    """Biases far from zero (a BN's batch mean is then mostly the bias: its absence would show)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-2.0, 2.0)
    return model


def _pair(model: nn.Module, dtype=F64) -> tuple[nn.Module, nn.Module]:
    plain = _randomize_conv_biases(randomize_bns(model.to(dtype)))
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


def _fused_pairs(fused: nn.Module) -> list[tuple[str, str]]:
    """(conv, BN) names of every pair a fused module of ``fused`` runs fused, the conv with a bias."""
    names = {id(m): n for n, m in fused.named_modules()}
    return sorted((names[id(conv)], names[id(bn)]) for m in fused.modules() if isinstance(m, Preparable)
                  for conv, bn in m.eval_pairs() if conv.bias is not None)


def _conv_biases(fused: nn.Module) -> set[str]:
    """The biases that a BN absorbs (their convs fused with the BN)."""
    return {f"{conv}.bias" for conv, _ in _fused_pairs(fused)}


def _assert_step(plain: nn.Module, fused: nn.Module, x: torch.Tensor, train: bool = True,
                 batch_stats: bool | None = None) -> None:
    """A step in ``train`` mode matches: every output, gradient and buffer within fp64's bar. Where the
    BNs normalise with batch statistics (``batch_stats``: by default in training) the gradient of the
    convs' biases is zero in exact arithmetic: the fused one must be an exact zero tensor (not None),
    eager's is rounding noise (checked against the largest gradient)."""
    biases = _conv_biases(fused) if (train if batch_stats is None else batch_stats) else set()
    errors = step_errors(plain, fused, x, train)
    errors = {k: v for k, v in errors.items() if k.removeprefix("grad ") not in biases}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= FP64_MODEL_TOL, f"{worst}: relative error {errors[worst]:.3e}"
    if not biases:
        return
    # step_errors zeroes the gradients: the conv biases' from a step of their own (the running
    # statistics move in both alike; the next step or eval compares them).
    plain(x).square().sum().backward()
    fused(x).square().sum().backward()
    grads = dict(plain.named_parameters())
    top = max(p.grad.norm().item() for p in plain.parameters() if p.grad is not None)
    for name, p in fused.named_parameters():
        if name in biases:
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
            assert grads[name].grad.norm().item() <= 1e-9 * top, name
    plain.zero_grad(), fused.zero_grad()


def _assert_train_step(plain: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    _assert_step(plain, fused, x, True)


def _assert_eval_and_prepared(plain: nn.Module, fused: nn.Module, x: torch.Tensor, batch_stats: bool = False) -> None:
    """Eval (the conv biases' gradients real, with running statistics) and prepared eval match in fp64."""
    _assert_step(plain, fused, x, False, batch_stats)
    prepared = fused_resnet.prepare_for_inference(copy.deepcopy(fused))
    with torch.no_grad():
        assert relative_error(prepared(x), plain.eval()(x)) <= FP64_MODEL_TOL


def _fused_fraction(model: nn.Module) -> tuple[int, int]:
    report = fused_resnet.fusion_report(model)
    return sum(v.startswith("fused") for v in report.values()), len(report)


def test_user_model_fp64_exact():
    """Every BN of the user model fused (chain, torchvision-like block, blocks with the add in the
    model's forward and a biased projection); three training steps, eval and prepared eval exact."""
    plain, fused = _pair(UserNet())
    assert _fused_fraction(fused) == (9, 9), fused_resnet.fusion_report(fused)
    assert len(_fused_pairs(fused)) == 9  # every conv before a BN has a bias
    assert isinstance(fused.stem[0], FusedConvBN2d) and isinstance(fused.stem[3], FusedConvBN2d)
    assert list(fused.state_dict()) == list(plain.state_dict())
    with fused_resnet.use_backend("reference"):
        for _ in range(3):
            _assert_train_step(plain, fused, torch.randn(2, 3, 12, 12, dtype=F64))
        _assert_eval_and_prepared(plain, fused, torch.randn(2, 3, 12, 12, dtype=F64))


def test_user_model_fp32_native_within_eager():
    """fp32 on the native backend: a training step, eval and prepared eval within eager's own error."""
    plain = _randomize_conv_biases(randomize_bns(UserNet()))
    assert_native_fp32_train_and_eval(plain, torch.randn(4, 3, 16, 16))


BN_VARIANTS = {
    "momentum=None": {"momentum": None},
    "no running stats": {"track_running_stats": False},
    "no affine": {"affine": False},
    "momentum=0.3, eps=1e-3": {"momentum": 0.3, "eps": 1e-3},
}


@pytest.mark.parametrize("kwargs", BN_VARIANTS.values(), ids=BN_VARIANTS.keys())
def test_bn_variants(kwargs):
    """A biased chain with BN settings that change the running-statistics update (cumulative average,
    none kept) or the affine step: three training steps and eval exact in fp64."""
    def bn(c):
        return nn.BatchNorm2d(c, **kwargs)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), bn(6), nn.ReLU(), nn.Conv2d(6, 4, 1), bn(4))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    plain = _randomize_conv_biases(model.to(F64))
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    assert _fused_fraction(fused) == (2, 2)
    with fused_resnet.use_backend("reference"):
        for _ in range(3):
            _assert_train_step(plain, fused, torch.randn(3, 3, 8, 8, dtype=F64))
        _assert_eval_and_prepared(plain, fused, torch.randn(3, 3, 8, 8, dtype=F64),
                                  batch_stats=not kwargs.get("track_running_stats", True))
    if kwargs.get("track_running_stats", True):
        assert torch.equal(fused[1].num_batches_tracked, plain[1].num_batches_tracked)
        assert plain[1].num_batches_tracked.item() == 6  # 3 x 2 training forwards


def test_weight_decay_moves_the_biases_as_unfused():
    """SGD with momentum and weight decay: the conv biases (zero gradient in training) decay as they
    do unfused; with a None gradient the optimizer would skip them."""
    plain, fused = _pair(UserNet())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05) for m in (plain, fused)]
    start = {n: p.detach().clone() for n, p in fused.named_parameters()}
    with fused_resnet.use_backend("reference"):
        for _ in range(3):
            x = torch.randn(2, 3, 12, 12, dtype=F64)
            for model, opt in zip((plain, fused), opts):
                model(x).square().sum().backward()
                opt.step()
                opt.zero_grad()
    params = dict(plain.named_parameters())
    for name in _conv_biases(fused):
        p = dict(fused.named_parameters())[name]
        assert not torch.equal(p, start[name]), name
        assert relative_error(p, params[name]) <= FP64_MODEL_TOL, name
    for name, p in fused.named_parameters():
        assert relative_error(p, params[name]) <= 1e-8, name


def test_prepared_conv_bias_edited_in_place():
    """A conv bias changed in place after prepare_for_inference: the prepared conv's guard sees it,
    warns, and the model gives the new answer (it folded the old bias before)."""
    plain, fused = _pair(UserNet())
    plain.eval()
    fused_resnet.prepare_for_inference(fused)
    x = torch.randn(2, 3, 12, 12, dtype=F64)
    with torch.no_grad():
        assert relative_error(fused(x), plain(x)) <= FP64_MODEL_TOL
        for model in (plain, fused):
            model.stem[3].bias.add_(0.5)
            model.block3.b.bias.mul_(-1.0)
        with pytest.warns(UserWarning, match="changed since prepare_for_inference"):
            out = fused(x)
        assert relative_error(out, plain(x)) <= FP64_MODEL_TOL
        fused_resnet.prepare_for_inference(fused)
        assert relative_error(fused(x), plain(x)) <= FP64_MODEL_TOL


def test_unfuse_restores_exactly():
    plain, fused = _pair(UserNet())
    keys = {k: v for k, v in fused.state_dict(keep_vars=True).items()}
    fused_resnet.unfuse(fused)
    assert [type(m) for m in fused.modules()] == [type(m) for m in plain.modules()]
    assert all(v is keys[k] for k, v in fused.state_dict(keep_vars=True).items())
    x = torch.randn(2, 3, 12, 12, dtype=F64)
    for train in (True, False):
        plain.train(train), fused.train(train)
        assert torch.equal(fused(x), plain(x))


def test_bias_added_after_fuse_is_absorbed():
    """A chain fused without a conv bias, given one later: the fused ops read it on every call."""
    plain = randomize_bns(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()).to(F64))
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    for model in (plain, fused):
        model[0].bias = nn.Parameter(torch.linspace(-1.0, 1.0, 4, dtype=F64))
    assert fused[0].fused_state() == (True, True)
    with fused_resnet.use_backend("reference"):
        _assert_train_step(plain, fused, torch.randn(2, 3, 8, 8, dtype=F64))
        _assert_eval_and_prepared(plain, fused, torch.randn(2, 3, 8, 8, dtype=F64))


# (timm model, BNs after a biased conv: unfused before, "its conv has a bias" or left in a traced forward)
TIMM = [("rexnet_100", 62, 13), ("resnest14d", 23, 4), ("hrnet_w18_small", 91, 4)]


@pytest.mark.parametrize("name, total, biased", TIMM, ids=[n for n, _, _ in TIMM])
def test_timm_models_with_biased_convs(name, total, biased):
    """ReXNet's SE (fc1 -> bn -> act), ResNeSt's split attention (fc1 -> bn1 -> act1) and HRNet's
    downsampling head: every BN fused now (their biased-conv BNs were not), exact in fp64 (two
    training steps, eval, prepared eval)."""
    timm = pytest.importorskip("timm")
    plain, fused = _pair(timm.create_model(name, pretrained=False, num_classes=10))
    assert _fused_fraction(fused) == (total, total)
    assert len(_fused_pairs(fused)) == biased, _fused_pairs(fused)
    with fused_resnet.use_backend("reference"):
        for _ in range(2):
            _assert_train_step(plain, fused, torch.randn(4, 3, 64, 64, dtype=F64))
        _assert_eval_and_prepared(plain, fused, torch.randn(4, 3, 64, 64, dtype=F64))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_conv_bn_relu_with_bias(training):
    """``ops.conv_bn_relu(bias=b)`` is ``relu(batch_norm(conv2d(x, w, b)))`` (running statistics updated
    alike in training), and fp64 ``gradcheck`` passes for x, w, b and the BN's affine parameters."""
    from torch.nn import functional as F

    from fused_resnet import ops

    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 6, dtype=F64, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, dtype=F64, requires_grad=True)
    b = torch.randn(5, dtype=F64).mul(2.0).requires_grad_()
    gamma = torch.rand(5, dtype=F64).add(0.5).requires_grad_()
    beta = torch.randn(5, dtype=F64, requires_grad=True)
    stats = [torch.randn(5, dtype=F64), torch.rand(5, dtype=F64).add(0.5)]
    ours, theirs = [t.clone() for t in stats], [t.clone() for t in stats]
    count = torch.zeros((), dtype=torch.long)
    with fused_resnet.use_backend("reference"):
        out = ops.conv_bn_relu(x, w, gamma, beta, *ours, count, padding=1, training=training, momentum=0.2, bias=b)
        want = F.relu(F.batch_norm(F.conv2d(x, w, b, padding=1), *theirs, gamma, beta, training, 0.2, 1e-5))
        assert relative_error(out, want) <= 1e-12
        for a, e in zip(ours, theirs):
            assert relative_error(a, e) <= 1e-12
        (grad_b,) = torch.autograd.grad(out.square().sum(), b)
        assert training == (not grad_b.any())  # zero with batch statistics, a real gradient in eval

        def f(x, w, b, gamma, beta):
            return ops.conv_bn_relu(x, w, gamma, beta, *[t.clone() for t in stats], padding=1, training=training,
                                    bias=b)
        assert torch.autograd.gradcheck(f, (x, w, b, gamma, beta))


def test_torch_export_eval_folds_the_bias_and_training_keeps_the_ops():
    """Under torch.export a fused biased chain and block in eval are plain ATen (each BN folded with
    ``running_mean - b``), equal to the unfused model; in training the fused ops stay, and the exported
    program updates the running mean as the unfused model does."""
    plain, fused = _pair(nn.Sequential(*UserNet().stem, TvLikeBlock(8)))
    x = torch.randn(2, 3, 10, 10, dtype=F64)
    program = torch.export.export(fused.eval(), (x,))
    assert not any("fused_resnet" in str(n.target) for n in program.graph.nodes)
    with torch.no_grad():
        assert relative_error(program.module()(x), plain.eval()(x)) <= FP64_MODEL_TOL
    program = torch.export.export(fused.train(), (x,))
    assert any("fused_resnet.conv_bn" in str(n.target) for n in program.graph.nodes)
    with fused_resnet.use_backend("reference"):
        exported = program.module()
        out, want = exported(x), plain.train()(x)
    assert relative_error(out, want) <= FP64_MODEL_TOL
    for (name, b), c in zip(plain.named_buffers(), exported.buffers()):
        if b.is_floating_point():
            assert relative_error(c, b) <= FP64_MODEL_TOL, name


@pytest.mark.parametrize("spec, joins", [("timm:resnet18", 0), ("tv:mobilenet_v2", 10)])
def test_blocks_and_joins_with_biased_convs(spec, joins):
    """timm's ResNet blocks (fused whole, ``_foreign.FusedResidualBlock``) and torchvision's
    InvertedResidual joins (``_joins``) with a bias given to every conv: every BN still fused (with the
    residual add where it was), exact in fp64."""
    lib = pytest.importorskip("timm" if spec.startswith("timm") else "torchvision")
    name = spec.split(":")[1]
    model = lib.create_model(name, pretrained=False, num_classes=10) if spec.startswith("timm") else \
        lib.models.__dict__[name](num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.bias = nn.Parameter(torch.zeros(m.out_channels))
    plain, fused = _pair(model)
    n, total = _fused_fraction(fused)
    report = fused_resnet.fusion_report(fused)
    assert n == total and sum(v.startswith("fused: with the residual add") for v in report.values()) == joins
    if spec.startswith("timm"):
        assert sum(type(m).__name__.startswith("FusedResidualBlock") for m in fused.modules()) == 8
    assert len(_fused_pairs(fused)) == total
    with fused_resnet.use_backend("reference"):
        _assert_train_step(plain, fused, torch.randn(2, 3, 64, 64, dtype=F64))
        _assert_eval_and_prepared(plain, fused, torch.randn(2, 3, 64, 64, dtype=F64))

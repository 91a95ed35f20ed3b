"""timm's extras at a fused residual join (issue #13): SE between the last BN and the add, and an
active DropPath, are the join's per-(sample, channel) gate (``_gates``); fused and unfused agree in
fp64 (outputs, every gradient, running statistics) with the same seed, so the same random draws;
DropBlock still makes its block run its own forward while it drops."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet import ops
from fused_resnet._tolerances import relative_error, tolerance

from _parity import assert_step_matches, grad_errors, randomize_bns

timm = pytest.importorskip("timm")

F64 = torch.float64


def _pair(name: str, dtype=F64, **kw):
    plain = randomize_bns(timm.create_model(name, pretrained=False, **kw).to(dtype))
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


def _x(dtype=F64, n=4):
    return torch.randn(n, 3, 64, 64, dtype=dtype)


@pytest.fixture
def gates(monkeypatch):
    """The gates the fused joins pass to ops.bn_add_relu (so a test sees the fused path ran)."""
    seen = []
    real = ops.bn_add_relu

    def spy(*args, gate=None, **kw):
        seen.append(gate)
        return real(*args, gate=gate, **kw)

    monkeypatch.setattr(ops, "bn_add_relu", spy)
    return seen


def _joins_fused(model) -> int:
    report = fused_resnet.fusion_report(model)
    assert all(v.startswith("fused") for v in report.values()), [k for k, v in report.items()
                                                                   if not v.startswith("fused")]
    return sum(v.startswith(("fused: in the residual block", "fused: with the residual add"))
               for v in report.values())


@pytest.mark.parametrize("spec", [("seresnet50", {}), ("resnet18", dict(block_args=dict(attn_layer="ese")))],
                         ids=["seresnet50", "resnet18-ese"])
def test_se_fused_train_eval_prepared(spec, gates):
    """SE blocks fused whole: every BN of seresnet50 (16 blocks) in a fused block; fp64 parity in
    training (two steps), eval, and prepared eval."""
    name, kw = spec
    plain, fused = _pair(name, **kw)
    blocks = sum(isinstance(m, fused_resnet._foreign.FusedResidualBlock) for m in fused.modules())
    assert blocks == (16 if name == "seresnet50" else 8)
    assert _joins_fused(fused) >= blocks
    with fused_resnet.use_backend("reference"):
        for train in (True, True, False):
            assert_step_matches(plain, fused, _x(), train)
    assert sum(g is not None for g in gates) == 3 * blocks  # every block's join ran gated, each step
    fused_resnet.prepare_for_inference(fused)
    x = _x()
    with fused_resnet.use_backend("reference"), torch.no_grad():
        assert relative_error(fused(x), plain(x)) <= 1e-9


@pytest.mark.parametrize("name", ["resnet18", "seresnet50", "regnetx_002"])
def test_drop_path_fused_same_draws(name, gates):
    """DropPath active (training, rate 0.3): the fused join draws its keep-scale with the block's own
    module, so with one seed fused and unfused drop the same samples; some sample is dropped."""
    plain, fused = _pair(name, drop_path_rate=0.3)
    drops = sum(type(m).__name__ == "DropPath" and m.drop_prob > 0 for m in fused.modules())
    assert drops >= 7  # timm's rates grow with depth from 0: the first block has none
    with fused_resnet.use_backend("reference"):
        for train in (True, True, False):
            assert_step_matches(plain, fused, _x(), train)
    gated = [g for g in gates if g is not None]
    assert len(gated) >= 2 * drops  # the two training steps ran fused, gated
    assert any((g.reshape(g.shape[0], -1) == 0).all(1).any() for g in gated), "no sample was dropped"


def test_drop_block_falls_back():
    """DropBlock (a per-pixel mask, no gate) active: the block runs its own forward, reported so."""
    plain, fused = _pair("resnet18", drop_block_rate=0.2)
    report = fused_resnet.fusion_report(fused)
    assert any("while its DropBlock drops" in v for v in report.values())
    with fused_resnet.use_backend("reference"):
        assert_step_matches(plain, fused, _x(), True)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_se_fp32_native_within_eager_error(layout):
    """fp32 on the native backend (csrc/gate.cpp): output and gradients within 3x eager fp32's own
    error against fp64, NCHW and channels_last, with an active DropPath."""
    if "native" not in fused_resnet.backends():
        pytest.skip("the native extension is not built for this torch")
    plain = randomize_bns(timm.create_model("seresnet50", pretrained=False, drop_path_rate=0.2))
    fused, gold = fused_resnet.fuse(copy.deepcopy(plain)), copy.deepcopy(plain).to(F64)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    for m in (plain, fused, gold):
        m.to(memory_format=fmt)
    x = _x(torch.float32, n=2).to(memory_format=fmt)
    outs = []
    with fused_resnet.use_backend("native"):
        for m, d in ((plain, torch.float32), (fused, torch.float32), (gold, F64)):
            torch.manual_seed(7)
            outs.append(m(x.to(d)))
    for out in outs:
        out.square().sum().backward()
    assert relative_error(outs[1], outs[2]) <= 3 * relative_error(outs[0], outs[2]) + tolerance(torch.float32)
    # Per gradient, those that are zero in exact arithmetic (a BN bias before a training BN through a
    # 1x1 conv) are rounding noise of a size that differs between two correct fp32 summation orders
    # (up to ~1e-2 of 1e-6 of the largest gradient, eager and fused alike): compared as a whole.
    eager, ours = grad_errors(gold, plain), grad_errors(gold, fused)
    assert max(ours.values()) <= 3 * max(eager.values()) + tolerance(torch.float32)
    mid = len(ours) // 2  # the typical gradient: its median error
    assert sorted(ours.values())[mid] <= 3 * sorted(eager.values())[mid] + tolerance(torch.float32)
    assert not any(v != v for v in ours.values())  # no NaN


def test_se_prepared_eval_keeps_channels_last(monkeypatch):
    """Serving in channels_last (prepared, native fp32), batch 1 and 2: every gated join's output stays
    channels_last (at batch 1 the join once returned NCHW, and the rest of the network ran NCHW against
    channels_last weights), and the output is within 3x eager fp32's own error against fp64."""
    if "native" not in fused_resnet.backends():
        pytest.skip("the native extension is not built for this torch")
    cl = torch.channels_last
    plain = randomize_bns(timm.create_model("seresnet50", pretrained=False)).eval().to(memory_format=cl)
    fused = fused_resnet.prepare_for_inference(fused_resnet.fuse(copy.deepcopy(plain)))
    gold = copy.deepcopy(plain).to(F64)
    layouts = []
    real = ops.bn_add_relu

    def spy(*args, **kw):
        out = real(*args, **kw)
        layouts.append(out.is_contiguous(memory_format=cl))
        return out

    monkeypatch.setattr(ops, "bn_add_relu", spy)
    for n in (1, 2):
        x = _x(torch.float32, n).to(memory_format=cl)
        with fused_resnet.use_backend("native"), torch.no_grad():
            out, eager, want = fused(x), plain(x), gold(x.to(F64))
        assert relative_error(out, want) <= 3 * relative_error(eager, want) + tolerance(torch.float32)
    assert len(layouts) == 2 * 16 and all(layouts), layouts

"""torch.fx on fused models: traced with the fused modules as leaves (fused_resnet.fx), a fused model
computes what the unfused model does, in eval and in training; torchvision's feature extractor works
with the documented tracer_kwargs; the unfused model traces as a plain one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet._tolerances import assert_close

from _parity import randomize_bns
from _tv_resnet import tv_resnet18

F32 = torch.float32
FP64_MODEL_TOL = 1e-9  # fused models vs unfused in fp64 (tests/test_fuse.py)


def _pair(ctor=tv_resnet18):
    torch.manual_seed(0)
    plain = randomize_bns(ctor(num_classes=10))
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


def _call_modules(graph_module) -> set[str]:
    return {n.target for n in graph_module.graph.nodes if n.op == "call_module"}


def test_symbolic_trace_needs_the_fused_leaves():
    _, fused = _pair()
    # Proxies reach our ops' argument checks: "symbolically traced variables cannot be used as inputs to
    # control flow" (the issue's report) or, in the C++ checks, "unpackString: expected bytes".
    with pytest.raises((torch.fx.proxy.TraceError, RuntimeError)):
        torch.fx.symbolic_trace(fused)
    traced = fused_resnet.fx.symbolic_trace(fused)
    assert {"layer1.0", "layer2.0", "conv1", "bn1", "relu"} <= _call_modules(traced)
    assert "layer1.0.bn1" not in _call_modules(traced)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_traced_fused_model_matches_the_unfused_model(train):
    """fp64, to the bar of the fused models' parity tests (a training forward in fp32 differs from
    eager's by up to ~1e-5 relative, which is the reduction order, not the tracing)."""
    plain, fused = _pair()
    plain.double().train(train), fused.double().train(train)
    traced = fused_resnet.fx.symbolic_trace(fused)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(traced(x), plain(x), tol=FP64_MODEL_TOL, name="traced fused model")
    for (name, a), b in zip(plain.named_buffers(), fused.buffers()):
        assert_close(b, a, tol=FP64_MODEL_TOL, name=name)  # running statistics (train) or untouched (eval)


def test_traced_unfused_model_is_plain_and_equal():
    plain, fused = _pair()
    plain.eval()
    traced = torch.fx.symbolic_trace(fused_resnet.unfuse(fused).eval())
    assert "layer1.0.bn1" in _call_modules(traced)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(traced(x), plain(x))


def test_create_feature_extractor_with_the_fused_leaves():
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    torchvision = pytest.importorskip("torchvision")
    plain, fused = _pair(torchvision.models.resnet18)
    plain.double(), fused.double()  # fp64: training forwards to the parity tests' bar
    nodes = {"layer1": "c2", "layer2.1": "c3_last_block", "layer4": "c5"}
    extract_plain = feature_extraction.create_feature_extractor(plain, return_nodes=nodes)
    extract_fused = feature_extraction.create_feature_extractor(
        fused, return_nodes=nodes, tracer_kwargs={"leaf_modules": fused_resnet.fx.leaf_modules()})
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for train in (False, True):
        extract_plain.train(train), extract_fused.train(train)
        with torch.no_grad():
            want, got = extract_plain(x), extract_fused(x)
        assert list(got) == list(nodes.values())
        for key in want:
            assert_close(got[key], want[key], tol=FP64_MODEL_TOL, name=f"{key} (train={train})")


def test_timm_fused_model_traces_with_the_fused_leaves():
    timm = pytest.importorskip("timm")
    plain, fused = _pair(lambda num_classes: timm.create_model("resnet18", pretrained=False, num_classes=num_classes))
    plain.eval(), fused.eval()
    traced = fused_resnet.fx.symbolic_trace(fused)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(traced(x), plain(x), F32, name="traced fused timm resnet18")


@pytest.mark.parametrize("train", [False, True])
def test_fused_densenet_traces_with_the_fused_leaves(train):
    torchvision = pytest.importorskip("torchvision")
    plain, fused = _pair(lambda num_classes: torchvision.models.densenet121(num_classes=num_classes))
    plain, fused = plain.double().train(train), fused.double().train(train)
    traced = fused_resnet.fx.symbolic_trace(fused)
    assert {"features.denseblock1", "features.transition1"} <= _call_modules(traced)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert_close(traced(x), plain(x), tol=FP64_MODEL_TOL, name=f"traced fused densenet121 (train={train})")

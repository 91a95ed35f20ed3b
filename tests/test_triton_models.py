"""Done-when of the Triton backend: a whole fused ResNet trained one step with
``use_backend("triton")`` matches the reference backend (outputs, every gradient, the running
statistics, the parameters after an SGD step). Without a GPU this runs in Triton's interpreter
on CPU tensors.

The models are torchvision's ResNet-18 and ResNet-50 structures with one block per stage (two in
the first stage of ResNet-50, so that both an identity and a downsample shortcut occur), at
64x64 input and batch 2: every kernel of the forward and backward runs, the stage-4 BN still
sees 8 values per channel (fewer makes the BN backward so ill-conditioned that fp32 round-off,
not the kernels, decides the result), and each test stays well under a minute on two CPU cores.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fused_resnet
from fused_resnet._tolerances import assert_close
from fused_resnet.models import BasicBlock, Bottleneck, ResNet

pytest.importorskip("triton")
from fused_resnet.backends.triton import _tiling

# A whole network accumulates fp32 round-off through ~20 layers of BN: the bar is 1e-4.
MODEL_TOL = 1e-4
DEVICE = "cpu" if _tiling.INTERPRETED else "cuda"
MODELS = {
    "resnet18": (BasicBlock, [1, 1, 1, 1]),
    "resnet50": (Bottleneck, [2, 1, 1, 1]),
}


def _train_step(model, backend, x, target):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with fused_resnet.use_backend(backend), fused_resnet.trace_dispatch() as log:
        out = model(x)
        torch.nn.functional.cross_entropy(out, target).backward()
    opt.step()
    return out, log


# Both layouts for ResNet-18; ResNet-50 (the slowest) in channels_last only, to keep CI short.
@pytest.mark.parametrize(("name", "layout"), [("resnet18", "nchw"), ("resnet18", "nhwc"), ("resnet50", "nhwc")])
def test_fused_resnet_one_training_step_matches_reference(name, layout):
    block, layers = MODELS[name]
    model = ResNet(block, layers, num_classes=10)
    fused_resnet.fuse(model)
    model.to(DEVICE).train()
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    expected_model = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64, device=DEVICE).contiguous(memory_format=fmt)
    target = torch.randint(0, 10, (2,), device=DEVICE)

    out, log = _train_step(model, "triton", x, target)
    expected, ref_log = _train_step(expected_model, "reference", x, target)

    # Every fused kernel of the step ran on Triton, and the same kernels as on the reference.
    assert [k for k, _ in log] == [k for k, _ in ref_log]
    assert {b for _, b in log} == {"triton"}, sorted(set(log))
    assert {k for k, _ in log} >= {"conv_stats", "conv_stats_backward", "bn_add_relu", "bn_add_relu_backward",
                                   "update_running_stats_"}
    assert_close(out, expected, tol=MODEL_TOL, name="logits")
    params = dict(expected_model.named_parameters())
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert_close(p.grad, params[pname].grad, tol=MODEL_TOL, name=f"grad {pname}")
        assert_close(p, params[pname], tol=MODEL_TOL, name=f"{pname} after the step")
    buffers = dict(expected_model.named_buffers())
    for bname, b in model.named_buffers():
        if b.is_floating_point():
            assert_close(b, buffers[bname], tol=MODEL_TOL, name=bname)
        else:
            assert torch.equal(b, buffers[bname]), bname


def test_fused_resnet18_eval_matches_reference():
    """Inference (BN folded into the convs: conv_bias_act with bias, residual and ReLU)."""
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    fused_resnet.fuse(model)
    model.to(DEVICE)
    with torch.no_grad():  # give the running statistics non-trivial values
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    with torch.no_grad(), fused_resnet.use_backend("triton"), fused_resnet.trace_dispatch() as log:
        out = model(x)
    assert {b for _, b in log} == {"triton"} and ("conv_bias_act", "triton") in log
    with torch.no_grad(), fused_resnet.use_backend("reference"):
        expected = model(x)
    assert_close(out, expected, tol=MODEL_TOL, name="logits")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_biased_conv_chain_training_step_and_eval_match_reference(layout):
    """Convs with biases before their BNs (absorbed: ``ops.conv_bn(bias=)``): a training step on Triton
    matches the reference (output, every gradient, the biases' an exact zero tensor, the running
    statistics updated with the mean of conv(x) + b by the ``update_running_stats_`` kernel), then eval."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.bias.uniform_(-2.0, 2.0)
    fused_resnet.fuse(model)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    model = model.to(DEVICE, memory_format=fmt).train()
    expected_model = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16, device=DEVICE).contiguous(memory_format=fmt)
    target = torch.randint(0, 10, (4,), device=DEVICE)
    out, log = _train_step(model, "triton", x, target)
    expected, ref_log = _train_step(expected_model, "reference", x, target)
    assert [k for k, _ in log] == [k for k, _ in ref_log]
    assert {b for _, b in log} == {"triton"} and ("update_running_stats_", "triton") in log, sorted(set(log))
    assert_close(out, expected, tol=MODEL_TOL, name="logits")
    params = dict(expected_model.named_parameters())
    for pname, p in model.named_parameters():
        if pname in ("0.bias", "3.bias"):
            assert p.grad is not None and not p.grad.any(), pname
        assert_close(p.grad, params[pname].grad, tol=MODEL_TOL, name=f"grad {pname}")
    buffers = dict(expected_model.named_buffers())
    for bname, b in model.named_buffers():
        assert_close(b.float(), buffers[bname].float(), tol=MODEL_TOL, name=bname)
    model.eval(), expected_model.eval()
    with torch.no_grad(), fused_resnet.use_backend("triton"):
        out = model(x)
    with torch.no_grad(), fused_resnet.use_backend("reference"):
        expected = expected_model(x)
    assert_close(out, expected, tol=MODEL_TOL, name="eval logits")

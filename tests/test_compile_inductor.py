"""``torch.compile`` with the DEFAULT backend (inductor) of a fused model, on the CPU with the native
backend: eval under ``no_grad`` and ``inference_mode`` (the oneDNN serving path forced on every conv,
and at its natural size above 2^23 multiply-adds), with inductor's ``freezing``, and training steps
(outputs, every gradient, running statistics). Each result is compared with the unfused model in eager
fp32 and an fp64 oracle (the rule of ``_lifecycle.check``), from one common state.

Inductor compiles C++ here (~10-30 s a graph on 2 cores): every test compiles one or two graphs.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fused_resnet
from fused_resnet._tolerances import relative_error

from _lifecycle import BACKWARD_KERNELS, TRAIN_KERNELS, check, check_dispatch
from _native_helpers import require_native
from _tv_resnet import tv_resnet18

require_native()
pytest.importorskip("torch._inductor")
CL = torch.channels_last
ONEDNN_MIN_MACS = 2**23


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def force_onednn(monkeypatch):
    monkeypatch.setenv("FUSED_RESNET_ONEDNN_MIN_MACS", "0")  # every conv takes the oneDNN path


def _models(width=8, train=False, biased=False):
    plain = tv_resnet18(width=width).to(memory_format=CL).train(train)
    if biased:  # every conv with a bias, absorbed by its BN (nn.Conv2d's default, common in users' models)
        for m in plain.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.bias = torch.nn.Parameter(torch.empty(m.out_channels).uniform_(-1.0, 1.0))
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    gold = copy.deepcopy(plain).double()
    return fused, plain, gold


def _x(n, size, dtype=torch.float32):
    return torch.randn(n, 3, size, size, dtype=dtype).to(memory_format=CL)


def _serve(fused, plain, gold, grad_mode, size, batches=(4, 4, 8)):
    """Compiled fused model vs eager plain vs fp64 oracle, several calls (a fresh input each)."""
    compiled = torch.compile(fused, fullgraph=True)
    for i, n in enumerate(batches):
        x = _x(n, size)
        with grad_mode(), fused_resnet.use_backend("native"):
            out = compiled(x)
            eager_fused = fused(x)
            expected = plain(x)
        with torch.no_grad():
            oracle = gold(x.double())
        check(out, expected, oracle, torch.float32, f"compiled eval call {i} (N={n})")
        check(eager_fused, expected, oracle, torch.float32, f"eager fused eval call {i} (N={n})")
    return compiled


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_compiled_eval_onednn_path_forced(force_onednn, grad_mode):
    _serve(*_models(), grad_mode, size=32)


def test_compiled_eval_above_the_onednn_threshold(monkeypatch):
    """ResNet-18 at width 32, 64x64, batch 4: every 3x3 conv of the blocks has ~9.4M multiply-adds, so
    the native serving path takes oneDNN at its default bound (no environment override)."""
    monkeypatch.delenv("FUSED_RESNET_ONEDNN_MIN_MACS", raising=False)
    fused, plain, gold = _models(width=32)
    conv = fused.layer1[0].conv1
    out_hw = (64 // 4) ** 2  # stem stride 2, max-pool stride 2
    assert 4 * out_hw * conv.weight.numel() >= ONEDNN_MIN_MACS
    _serve(fused, plain, gold, torch.no_grad, size=64, batches=(4, 4))


def test_compiled_eval_with_freezing(force_onednn):
    """``freezing``: the parameters become constants of the graph (the README's CPU serving advice)."""
    fused, plain, gold = _models()
    with torch._inductor.config.patch(freezing=True):
        _serve(fused, plain, gold, torch.no_grad, size=32)


def test_compiled_eval_sees_parameter_updates_between_calls(force_onednn):
    """Without freezing the parameters are graph inputs: an in-place edit between calls (an EMA update,
    a checkpoint load) must show in the next call's output."""
    fused, plain, gold = _models()
    compiled = _serve(fused, plain, gold, torch.no_grad, size=32, batches=(4,))
    for step in range(2):
        with torch.no_grad():
            for m in (fused, plain, gold):
                m.layer2[0].conv2.weight.mul_(1.5 - step)
                m.layer3[0].bn1.running_var.mul_(2.0)
            x = _x(4, 32)
            with fused_resnet.use_backend("native"):
                out, expected = compiled(x), plain(x)
            check(out, expected, gold(x.double()), torch.float32, f"compiled eval after in-place edit {step}")


def test_compiled_training_steps_then_eval(force_onednn):
    """Two SGD steps of the compiled fused model (outputs, every gradient, running statistics, from a
    common state each step), then eval of the same compiled model. At 64 px: at 32 px the last stage
    normalises over 4 values (batch 4, 1x1 maps) and amplifies rounding chaotically, so that one fp32
    evaluation's error is a noisy sample of eager's (after one step, on an AVX-512 CPU: gradients
    5e-6 with ATen's own convs, 2.2e-5 by oneDNN in channels_last, 6.7e-5 in NCHW; fused 3.5x the
    largest on some states, 0.3-2x on most). Eager's own error: the larger of its twin's in
    channels_last and in NCHW."""
    fused, plain, gold = _models(train=True)
    plain_nchw = copy.deepcopy(plain).to(memory_format=torch.contiguous_format)
    compiled = torch.compile(fused, fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (fused, plain, gold)]
    for step in range(2):
        state = fused.state_dict()
        for twin in (plain, plain_nchw, gold):
            twin.load_state_dict(state)
            twin.zero_grad()
        x = _x(4, 64)
        with fused_resnet.use_backend("native"), fused_resnet.trace_dispatch() as log:
            out = compiled(x)
            g = torch.randn_like(out)
            out.backward(g)
        check_dispatch(log, "native", torch.float32, TRAIN_KERNELS | BACKWARD_KERNELS)
        expected, expected_nchw, oracle = plain(x), plain_nchw(x.contiguous()), gold(x.double())
        expected.backward(g), expected_nchw.backward(g), oracle.backward(g.double())
        check(out, (expected, expected_nchw), oracle, torch.float32, f"step {step}: output")
        for (name, p), q, q2, r in zip(fused.named_parameters(), plain.parameters(), plain_nchw.parameters(),
                                       gold.parameters()):
            check(p.grad, (q.grad, q2.grad), r.grad, torch.float32, f"step {step}: grad {name}")
        for (name, b), c, d in zip(fused.named_buffers(), plain.buffers(), gold.buffers()):
            if b.is_floating_point():
                check(b, c, d, torch.float32, f"step {step}: {name}")
            else:
                assert torch.equal(b, c), name
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for m in (fused, plain, gold):
        m.eval()
    state = fused.state_dict()
    plain.load_state_dict(state), gold.load_state_dict(state)
    x = _x(4, 32)
    with torch.no_grad(), fused_resnet.use_backend("native"):
        out, expected = compiled(x), plain(x)
        oracle = gold(x.double())
    check(out, expected, oracle, torch.float32, "compiled eval after compiled training")
    assert relative_error(out, expected) < 1e-3  # not merely a NaN-free result


def test_compiled_biased_convs_train_step_then_eval(force_onednn):
    """Every conv of the ResNet with a bias (absorbed by its BN): a compiled training step (output, every
    gradient, the biases' an exact zero tensor, running statistics), then compiled eval (each BN folded
    with ``running_mean - bias`` in the ATen graph)."""
    fused, plain, gold = _models(train=True, biased=True)
    biases = {f"{n}.bias" for n, m in plain.named_modules() if isinstance(m, torch.nn.Conv2d)}
    compiled = torch.compile(fused, fullgraph=True)
    x = _x(4, 32)
    with fused_resnet.use_backend("native"):
        out = compiled(x)
        g = torch.randn_like(out)
        out.backward(g)
    expected, oracle = plain(x), gold(x.double())
    expected.backward(g), oracle.backward(g.double())
    check(out, expected, oracle, torch.float32, "train output")
    for (name, p), q, r in zip(fused.named_parameters(), plain.parameters(), gold.parameters()):
        if name in biases:  # zero in exact arithmetic: the BN's batch mean takes the bias away
            assert p.grad is not None and not p.grad.any(), name
            continue
        check(p.grad, q.grad, r.grad, torch.float32, f"grad {name}")
    for (name, b), c, d in zip(fused.named_buffers(), plain.buffers(), gold.buffers()):
        if b.is_floating_point():
            check(b, c, d, torch.float32, name)
        else:
            assert torch.equal(b, c), name
    for m in (fused, plain, gold):
        m.eval()
    x = _x(4, 32)
    with torch.no_grad(), fused_resnet.use_backend("native"):
        out, expected = compiled(x), plain(x)
        oracle = gold(x.double())
    check(out, expected, oracle, torch.float32, "compiled eval")
    assert relative_error(out, expected) < 1e-3

"""The per-call backend choice: names, precedence, availability errors and fallbacks."""

import os
import subprocess
import sys

import pytest
import torch

import fused_resnet
from fused_resnet import _backend
from fused_resnet._tolerances import assert_close

from _cases import CONV_SHAPES, conv_case


def _run_conv_stats(args=None):
    return torch.ops.fused_resnet.conv_stats(*(args or conv_case(CONV_SHAPES[0])))


def test_reference_always_available_and_named_backends_listed():
    assert "reference" in fused_resnet.backends("cpu")
    assert set(fused_resnet.backends("cpu")) <= {"reference", "triton", "native"}


def test_use_backend_records_and_restores():
    before = fused_resnet.get_backend()
    with fused_resnet.use_backend("reference"), fused_resnet.trace_dispatch() as log:
        assert fused_resnet.get_backend() == "reference"
        _run_conv_stats()
    assert log == [("conv_stats", "reference")]
    assert fused_resnet.get_backend() == before


def test_set_backend_is_overridden_by_use_backend():
    try:
        fused_resnet.set_backend("reference")
        assert fused_resnet.get_backend() == "reference"
        with fused_resnet.use_backend("auto"):
            assert fused_resnet.get_backend() == "auto"
    finally:
        fused_resnet.set_backend("auto")


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="unknown fused_resnet backend"):
        fused_resnet.set_backend("cudnn")
    with pytest.raises(ValueError, match="unknown fused_resnet backend"):
        with fused_resnet.use_backend("fast"):
            pass


def test_named_backend_that_cannot_run_says_why(monkeypatch):
    backend = _backend.register_backend("fake", lambda device: "needs a flux capacitor")
    monkeypatch.setattr(_backend, "BACKEND_NAMES", _backend.BACKEND_NAMES + ("fake",))
    try:
        with fused_resnet.use_backend("fake"), pytest.raises(fused_resnet.BackendUnavailableError, match="flux"):
            _run_conv_stats()
    finally:
        _backend._registry.pop(backend.name)


def test_unsupported_arguments_fall_back_to_reference(monkeypatch):
    calls = []
    backend = _backend.register_backend("picky", lambda device: None)

    @_backend.register_kernel("picky", "conv_stats", supports=lambda x, *rest: x.dtype == torch.float16)
    def _never(*args):
        calls.append(args)
        raise AssertionError("must not run on float32")

    monkeypatch.setattr(_backend, "BACKEND_NAMES", _backend.BACKEND_NAMES + ("picky",))
    args = conv_case(CONV_SHAPES[0])
    try:
        with fused_resnet.use_backend("picky"), fused_resnet.trace_dispatch() as log:
            got = _run_conv_stats(args)
        with fused_resnet.use_backend("reference"):
            want = _run_conv_stats(args)
    finally:
        _backend._registry.pop(backend.name)
    assert not calls and log == [("conv_stats", "reference")]
    for g, w in zip(got, want):
        assert_close(g, w)


def test_environment_variable_sets_the_default():
    code = "import fused_resnet; print(fused_resnet.get_backend())"
    env = dict(os.environ, FUSED_RESNET_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def test_auto_on_cpu_picks_native_when_built_else_reference():
    with fused_resnet.use_backend("auto"), fused_resnet.trace_dispatch() as log:
        _run_conv_stats()
    expected = "native" if "native" in fused_resnet.backends("cpu") else "reference"
    assert log == [("conv_stats", expected)]



@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_backward_runs_on_the_backend_its_forward_asked_for(backend):
    """use_backend() is a context variable, which autograd's CUDA threads do not see: the backend is
    recorded at forward. Here the backward runs after the context is left, as it would on such a thread."""
    if backend not in fused_resnet.backends("cpu"):
        pytest.skip(f"{backend} unavailable here: {_backend.unavailable_reason(backend, 'cpu')}")
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    gamma, beta = torch.rand(4).add_(0.5).requires_grad_(), torch.randn(4, requires_grad=True)
    with fused_resnet.trace_dispatch() as log:
        with fused_resnet.use_backend(backend):
            out = fused_resnet.ops.conv_bn_relu(x, w, gamma, beta, torch.zeros(4), torch.ones(4), padding=1)
            folded = fused_resnet.ops.conv_bias_act(x, w, beta, relu=True, padding=1)
        (out.sum() + folded.sum()).backward()
    backward = [(k, b) for k, b in log if k.endswith("_backward")]
    ran = {k for k, _ in backward}
    # The Python backends compose conv_bn_backward of their conv_stats_backward, which shows too.
    assert {"bn_add_relu_backward", "conv_bn_backward", "conv_bias_act_backward"} <= ran
    assert ran <= {"bn_add_relu_backward", "conv_bn_backward", "conv_stats_backward", "conv_bias_act_backward"}
    assert all(b == backend for _, b in log), log


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_running_statistics_writes_are_seen_by_pytorch(backend):
    """update_running_stats_ bumps the version counters of what it writes, whichever kernel ran
    (a Triton or CUDA kernel writes through raw pointers, which PyTorch cannot see)."""
    if backend not in fused_resnet.backends("cpu"):
        pytest.skip(f"{backend} unavailable here: {_backend.unavailable_reason(backend, 'cpu')}")
    state = [torch.randn(6), torch.rand(6) + 0.5, torch.tensor(2, dtype=torch.long)]
    before = [t._version for t in state]
    with fused_resnet.use_backend(backend), fused_resnet.trace_dispatch() as log:
        torch.ops.fused_resnet.update_running_stats_(*state, torch.randn(6), torch.rand(6), 10, 0.1)
    assert log == [("update_running_stats_", backend)]
    assert all(t._version > v for t, v in zip(state, before))


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_conv_bn_running_statistics_writes_are_seen_by_pytorch(backend, grad):
    """conv_bn updates the running statistics inside the op (below autograd, where in-place ATen ops
    bump no version counter themselves): their version counters move, whichever kernel ran."""
    if backend not in fused_resnet.backends("cpu"):
        pytest.skip(f"{backend} unavailable here: {_backend.unavailable_reason(backend, 'cpu')}")
    state = [torch.randn(6), torch.rand(6) + 0.5, torch.tensor(2, dtype=torch.long)]
    before = [t._version for t in state]
    x, w = torch.randn(2, 4, 5, 5, requires_grad=grad), torch.randn(6, 4, 3, 3)
    with fused_resnet.use_backend(backend), torch.set_grad_enabled(grad):
        torch.ops.fused_resnet.conv_bn(x, None, None, False, w, None, None, *state, 0.1, 1e-5, [1, 1], [1, 1],
                                       [1, 1], 1)
    assert all(t._version > v for t, v in zip(state, before))
    assert int(state[2]) == 3

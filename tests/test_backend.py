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

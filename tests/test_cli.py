"""`python -m fused_resnet info` and `check` run and tell the truth."""

import subprocess
import sys

import pytest

from fused_resnet.__main__ import main


def test_info_lists_versions_and_backends(capsys):
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backends on cpu" in out
    for name in ("reference", "triton", "native"):
        assert f"  {name}" in out
    from fused_resnet.backends import native

    assert "native backend:" in out  # what the extension does here, or why it is not loaded
    assert ("built against torch" in out) == (native.LOAD_ERROR is None)


def test_check_passes_with_the_reference_oracle(capsys):
    assert main(["check", "--device", "cpu", "--dtype", "float64", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "model train step" in out and "all passed" in out and "FAIL" not in out


def test_check_reports_failure_of_a_wrong_backend(monkeypatch, capsys):
    from fused_resnet import _backend, reference

    backend = _backend.register_backend("broken", lambda device: None)
    _backend.register_kernel("broken", "bn_add_relu")(lambda *a: reference.bn_add_relu(*a) * 1.01)
    monkeypatch.setattr(_backend, "BACKEND_NAMES", _backend.BACKEND_NAMES + ("broken",))
    try:
        assert main(["check", "--device", "cpu", "--dtype", "float32", "--backend", "broken"]) == 1
    finally:
        _backend._registry.pop(backend.name)
    assert "FAIL" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "fused_resnet", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_cuda_check_without_gpu_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["check", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().out

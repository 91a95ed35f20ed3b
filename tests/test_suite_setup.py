"""The test suite's own setup works with the tools it may meet: `pytest tests` without pytest-benchmark
(no plugin options in pyproject's addopts), and the native tests' TF32 switch on the installed pytest
(whose monkeypatch cannot undo torch's ``__getattr__`` flags, see ``_native_helpers.no_tf32``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import _native_helpers  # a module, not its names: its autouse fixture stays out of this file
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _pytest(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:benchmark", "-p", "no:cacheprovider", "-q", *args]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), check=False, capture_output=True, text=True,
                          timeout=600)


def test_suite_runs_without_pytest_benchmark():
    result = _pytest("tests/test_data.py::test_digits_split_shapes_and_normalisation")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout and "error" not in result.stdout.lower(), result.stdout[-3000:]


@pytest.mark.skipif(_native_helpers.REASON is not None, reason=f"native backend unavailable: {_native_helpers.REASON}")
def test_native_tests_set_up_and_tear_down_cleanly():
    result = _pytest("tests/test_native_kernels.py::test_update_running_stats")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "error" not in result.stdout.lower(), result.stdout[-3000:]


def test_no_tf32_restores_the_flags():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with pytest.raises(KeyError), _native_helpers.no_tf32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            raise KeyError  # restored on the way out of an error too
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before

"""setup.py's CUDA toolkit search, and installing with a CUDA torch but no usable toolkit: setup.py then
builds the CPU kernels, warns, and the built extension says why it has no CUDA kernels; FORCE_CUDA=1
makes that an error instead.

The builds run only where torch is a CUDA build (a CPU torch never looks for a toolkit). They are
CPU-only (~1 minute on 2 cores), from a copy of the sources in a temporary directory, so that neither
the source tree's extension nor its build/ directory is touched."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

needs_cuda_torch = pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build: no toolkit search")


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py's functions: the script run as `setup.py --name` (pure Python, so no torch import or build)."""
    monkeypatch.setenv("FUSED_RESNET_SKIP_EXT", "1")
    monkeypatch.setattr(sys, "argv", ["setup.py", "--name"])
    monkeypatch.chdir(ROOT)
    return runpy.run_path(str(ROOT / "setup.py"))


def _fake_toolkit(root: Path) -> Path:
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "bin").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    return root


def test_toolkit_search(setup_py, tmp_path, monkeypatch):
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    # A wrapper nvcc, as in /usr/local/bin: torch guesses its parent's parent, which has no headers.
    wrapper_root = tmp_path / "local"
    (wrapper_root / "bin").mkdir(parents=True)
    (wrapper_root / "bin" / "nvcc").write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    (wrapper_root / "bin" / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper_root / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert setup_py["_nvcc_toolkit"]() == str(toolkit)
    found, _ = setup_py["_find_cuda_toolkit"](str(wrapper_root))
    assert found is not None and found != str(wrapper_root) and setup_py["_is_toolkit"](found)

    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert setup_py["_find_cuda_toolkit"](str(toolkit)) == (str(toolkit), "")
    # An explicit CUDA_HOME that is no toolkit is not replaced by a guess: no CUDA kernels, and why.
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    found, why = setup_py["_find_cuda_toolkit"](str(tmp_path))
    assert found is None and f"CUDA_HOME={tmp_path} is not a CUDA toolkit" in why


def _env_without_cuda(empty_cuda_home: Path) -> dict[str, str]:
    """CUDA_HOME at an empty directory and no nvcc on PATH; the rest of PATH (the C++ compiler) intact."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_PATH", "FORCE_CUDA", "FUSED_RESNET_SKIP_CUDA",
                                                            "FUSED_RESNET_SKIP_EXT", "PYTHONPATH")}
    path = [d for d in env.get("PATH", "").split(os.pathsep) if d and not os.path.exists(os.path.join(d, "nvcc"))]
    env.update(PATH=os.pathsep.join(path), CUDA_HOME=str(empty_cuda_home), MAX_JOBS="2")
    return env


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "csrc", src / "csrc")
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    shutil.copytree(ROOT / "fused_resnet", src / "fused_resnet", ignore=ignore)
    (src / "empty_cuda_home").mkdir()
    return src


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, check=False, capture_output=True, text=True,
                          timeout=900)


@needs_cuda_torch
def test_no_toolkit_builds_cpu_kernels_and_says_why(source_copy):
    env = _env_without_cuda(source_copy / "empty_cuda_home")
    result = _run(["setup.py", "build_ext", "--inplace", "--build-lib", "build/lib", "--build-temp", "build/temp"],
                  source_copy, env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "WARNING (fused_resnet): building the CPU kernels only" in log, log[-6000:]
    assert f"CUDA_HOME={source_copy / 'empty_cuda_home'} is not a CUDA toolkit" in log
    assert not (source_copy / "build" / "temp" / "csrc" / "cuda").exists()  # no CUDA source was compiled
    assert (source_copy / "build" / "temp" / "csrc" / "cpu").is_dir()

    # The built module, imported from the copy (the working directory comes first on sys.path).
    info = _run(["-m", "fused_resnet", "info", "--device", "cuda"], source_copy, env)
    assert info.returncode == 0, info.stderr[-4000:]
    code = ("import fused_resnet; from fused_resnet import _C, _backend; print(fused_resnet.__file__); "
            "print(_C.WITH_CUDA); print(_C.CUDA_SKIP_REASON); print(_backend.unavailable_reason('native', 'cuda'))")
    probe = _run(["-c", code], source_copy, env)
    assert probe.returncode == 0, probe.stderr[-4000:]
    where, with_cuda, reason, unavailable = probe.stdout.strip().splitlines()[-4:]
    assert where.startswith(str(source_copy)), where
    assert with_cuda == "False"
    assert f"torch {torch.__version__} is a CUDA build" in reason and "set CUDA_HOME to the toolkit root" in reason
    assert unavailable == f"the extension was built without CUDA kernels: {reason}"
    assert f"CUDA kernels: no ({reason})" in info.stdout and unavailable in info.stdout, info.stdout


@needs_cuda_torch
def test_force_cuda_without_toolkit_is_a_clear_error(source_copy):
    env = _env_without_cuda(source_copy / "empty_cuda_home") | {"FORCE_CUDA": "1"}
    result = _run(["setup.py", "--name"], source_copy, env)
    assert result.returncode != 0
    assert "FORCE_CUDA=1 but no CUDA kernels can be built" in result.stderr, result.stderr[-4000:]
    assert "is not a CUDA toolkit" in result.stderr

"""tests/cpp/aoti_run.cpp, compiled against this torch (LibTorch only, no Python), and its run environment:
shared by the eval (test_aoti.py) and training (test_aoti_train.py) AOTInductor tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch
from torch.utils import cpp_extension

RUNNER = Path(__file__).parent / "cpp" / "aoti_run.cpp"


_BUILT: list[Path] = []  # compiled once a session (pytest keeps its tmp dirs until a later session)


def build_runner(out: Path) -> Path:
    """The runner's executable (in ``out`` if it is not built yet this session); fails the test with g++'s
    output if it does not compile."""
    if _BUILT and _BUILT[0].exists():
        return _BUILT[0]
    exe = out / "aoti_run"
    libs = cpp_extension.library_paths()
    cmd = ["g++", "-std=c++20", "-O1", str(RUNNER), "-o", str(exe),
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd += [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs] + ["-ltorch", "-ltorch_cpu", "-lc10", "-ldl"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-5000:]}"
    _BUILT[:] = [exe]
    return exe


def run(exe: Path, args: list[str]) -> subprocess.CompletedProcess:
    """The runner with LibTorch's lib/ on LD_LIBRARY_PATH (the package's model library dlopens libtorch.so
    by name) and nothing of Python in its environment."""
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600, check=False,
                          env={"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": os.pathsep.join(cpp_extension.library_paths())})

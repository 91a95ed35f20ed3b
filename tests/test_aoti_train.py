"""AOTInductor of a *training-mode* graph with fused_resnet's ops (docs/design.md, decision 7): a fused
model exported in train mode keeps torch.ops.fused_resnet.* (their batch statistics and running-statistics
updates), inductor compiles it into a package whose model library calls them through the dispatcher
(AOTInductor's proxy executor), and a C++ program that loads only fused_resnet/_C_ops.so (no Python, no
libtorch_python) runs it like Python does.

The package is a forward in training mode (batch statistics, running statistics updated in the package's
own buffers), not a training step: export does not produce a backward graph to compile.

Slow: inductor compiles the model's C++ (a minute on 2 cores), and g++ the C++ runner."""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path

import pytest
import torch

import fused_resnet
from fused_resnet._tolerances import assert_close
from fused_resnet.small_resnet import small_resnet

import _aoti_runner
from _parity import randomize_bns

pytestmark = pytest.mark.slow
F32 = torch.float32
SHAPE = (4, 3, 16, 16)
C_OPS = Path(fused_resnet.__file__).parent / "_C_ops.so"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """(package path, input, the unfused model's training-mode output, the package's output in Python)."""
    if not C_OPS.exists():
        pytest.fail(f"{C_OPS} is not built")
    torch.manual_seed(0)
    plain = randomize_bns(small_resnet(fused=False, widths=(8, 16), blocks=(1, 1))).train()
    fused = fused_resnet.fuse(copy.deepcopy(plain)).train()
    x = torch.randn(SHAPE)
    program = torch.export.export(fused, (x,))
    ours = {str(n.target) for n in program.graph.nodes if "fused_resnet" in str(n.target)}
    assert ours, "the training export has none of fused_resnet's ops"
    path = tmp_path_factory.mktemp("aoti_train") / "fused_train.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    with torch.no_grad():
        expected = plain(x)
        in_python = torch._inductor.aoti_load_package(str(path))(x)
    return path, x, expected, in_python


def test_training_package_calls_our_ops_and_runs_from_python(package):
    path, x, expected, in_python = package
    with zipfile.ZipFile(path) as archive:  # the proxy executor's record of the ops it calls by name
        text = b"".join(archive.read(n) for n in archive.namelist() if n.endswith(".json"))
    assert b"fused_resnet" in text, "the package calls none of fused_resnet's ops"
    assert_close(in_python, expected, F32, name="AOTInductor training package (Python)")


def test_training_package_runs_from_cpp_with_only_the_ops_library(package, tmp_path):
    path, x, expected, in_python = package
    exe = _aoti_runner.build_runner(tmp_path)
    (tmp_path / "x.bin").write_bytes(x.numpy().tobytes())
    args = [str(path), str(tmp_path / "x.bin"), str(tmp_path / "y.bin"), *map(str, SHAPE)]
    without = _aoti_runner.run(exe, args)  # the ops are the library's: without it the package cannot run
    assert without.returncode != 0 and "fused_resnet" in without.stdout + without.stderr, without
    result = _aoti_runner.run(exe, ["--load", str(C_OPS), *args])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["shape", *map(str, expected.shape)]
    got = torch.frombuffer(bytearray((tmp_path / "y.bin").read_bytes()), dtype=F32).reshape(expected.shape)
    assert torch.isfinite(got).all()
    assert_close(got, in_python, F32, name="AOTInductor training package, C++ vs Python")
    assert_close(got, expected, F32, name="AOTInductor training package (C++) vs the unfused model")

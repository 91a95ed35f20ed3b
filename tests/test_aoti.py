"""torch.export -> AOTInductor: a fused model in eval exports to plain ATen, compiles into a package
(torch._inductor.aoti_compile_and_package) and runs, equal to the unfused model, where fused_resnet
is not installed: from Python (an isolated process that cannot import it) and from C++ (LibTorch
only, tests/cpp/aoti_run.cpp).

Slow: inductor compiles the model's C++ (a minute or two on 2 cores), and g++ the C++ runner."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet.small_resnet import small_resnet
from fused_resnet._tolerances import assert_close

import _aoti_runner
from _isolated import run_without_fused_resnet

pytestmark = pytest.mark.slow
F32 = torch.float32
SHAPE = (2, 3, 16, 16)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """(package path, input, the unfused model's output) for a tiny fused ResNet in eval."""
    torch.manual_seed(0)
    plain = small_resnet(fused=False, widths=(8, 16), blocks=(1, 1))
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0), m.bias.normal_(0, 0.2)
    plain.eval()
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    x = torch.randn(SHAPE)
    program = torch.export.export(fused, (x,))
    assert not any("fused_resnet" in str(n.target) for n in program.graph.nodes)
    path = tmp_path_factory.mktemp("aoti") / "fused_small_resnet.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    with torch.no_grad():
        expected = plain(x)
    return path, x, expected


def test_aoti_package_runs_from_python_without_fused_resnet(package, tmp_path):
    path, x, expected = package
    torch.save(x, tmp_path / "x.pt")
    run_without_fused_resnet(f"""
        model = torch._inductor.aoti_load_package({str(path)!r})
        with torch.no_grad():
            torch.save(model(torch.load("x.pt")), "y.pt")
    """, cwd=tmp_path)
    assert_close(torch.load(tmp_path / "y.pt"), expected, F32, name="AOTInductor package (Python)")


def test_aoti_package_runs_from_cpp(package, tmp_path):
    """The runner's environment: LibTorch's lib/ on LD_LIBRARY_PATH (the package's model library
    dlopens libtorch.so by name), nothing of Python."""
    path, x, expected = package
    exe = _aoti_runner.build_runner(tmp_path)
    (tmp_path / "x.bin").write_bytes(x.numpy().tobytes())
    result = _aoti_runner.run(exe, [str(path), str(tmp_path / "x.bin"), str(tmp_path / "y.bin"), *map(str, SHAPE)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["shape", *map(str, expected.shape)]
    got = torch.frombuffer(bytearray((tmp_path / "y.bin").read_bytes()), dtype=F32).reshape(expected.shape)
    assert_close(got, expected, F32, name="AOTInductor package (C++)")

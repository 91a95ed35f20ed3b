"""torch.export of a fused model in training mode (fine-tuning pipelines): the program keeps
fused_resnet's ops (torch.ops.fused_resnet.*), so loading it needs fused_resnet installed, with its
extension built for that torch: `import fused_resnet` before `torch.export.load`. Saved, then loaded
in a fresh process, it trains like the unfused model (output, every gradient, running statistics);
where fused_resnet is absent, loading it fails (torch's warnings name the op it cannot find)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet._tolerances import assert_close
from fused_resnet.small_resnet import small_resnet

from _isolated import run_without_fused_resnet

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-9  # fused vs unfused in fp64


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(saved program, input, the plain model) for a tiny fused ResNet exported in training mode."""
    torch.manual_seed(0)
    plain = small_resnet(fused=False, widths=(8, 16), blocks=(1, 1))
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
    plain.double()  # fp64: a training step to the parity tests' bar (fp32 differs by ~1e-5 in reduction order)
    fused = fused_resnet.fuse(copy.deepcopy(plain)).train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    program = torch.export.export(fused, (x,))
    assert any(str(n.target).startswith("fused_resnet.") for n in program.graph.nodes)
    path = tmp_path_factory.mktemp("export_train") / "fused_train.pt2"
    torch.export.save(program, str(path))
    return path, x, plain.train()


def test_training_program_loads_with_fused_resnet_and_trains_like_the_unfused_model(saved, tmp_path):
    path, x, plain = saved
    torch.save(x, tmp_path / "x.pt")
    code = textwrap.dedent(f"""
        import torch
        import fused_resnet  # registers torch.ops.fused_resnet.* (and their autograd) before loading
        model = torch.export.load({str(path)!r}).module()
        out = model(torch.load("x.pt"))
        out.square().mean().backward()
        torch.save({{"out": out.detach(), "grads": {{n: p.grad for n, p in model.named_parameters()}},
                     "buffers": dict(model.named_buffers())}}, "result.pt")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    got = torch.load(tmp_path / "result.pt")
    out = plain(x)
    out.square().mean().backward()
    assert_close(got["out"], out.detach(), tol=TOL, name="output")
    grads = dict(plain.named_parameters())
    assert set(got["grads"]) == set(grads)
    for name, grad in got["grads"].items():
        assert_close(grad, grads[name].grad, tol=TOL, name=f"grad {name}")
    buffers = dict(plain.named_buffers())
    for name, buffer in got["buffers"].items():
        assert_close(buffer.double(), buffers[name].double(), tol=TOL, name=name)


def test_training_program_without_fused_resnet_fails_naming_the_op(saved, tmp_path):
    path, _, _ = saved
    result = run_without_fused_resnet(f"""
        try:
            torch.export.load({str(path)!r}).module()(torch.randn(4, 3, 16, 16, dtype=torch.float64))
        except Exception as exc:
            print("refused:", type(exc).__name__, exc)
    """, cwd=tmp_path)
    assert "refused:" in result.stdout, result.stdout
    assert "conv_stats" in result.stdout + result.stderr  # torch's warnings name the op it cannot find

"""The wheel: `pip wheel . --no-build-isolation` builds one, and that wheel installed into a fresh
virtual environment (seeing the running torch) imports with the native backend working.

Slow the first time (it compiles the extension); reuses build/ afterwards."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k != "FUSED_RESNET_SKIP_EXT"}
    _run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-build-isolation", "--no-deps", "-w", str(out)],
         cwd=ROOT, env=env, timeout=3600)
    wheels = list(out.glob("fused_resnet-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_is_platform_specific_and_contains_the_extension(wheel):
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("fused_resnet/_C") and n.endswith(".so") for n in names), names
    assert not any(n.startswith("csrc/") for n in names)
    # A compiled extension: the tag names the interpreter and platform, never py3-none-any.
    assert "-none-any" not in wheel.name and "linux" in wheel.name, wheel.name


def test_wheel_installs_and_runs_native(wheel, tmp_path):
    # Nothing of the source tree may be visible (PYTHONPATH would also show pip its egg-info and
    # make it skip the install as "already satisfied").
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=env, timeout=600)
    python = venv / "bin" / "python"
    # The fresh environment sees this one's torch: its site-packages as plain paths (a .pth line adds a
    # directory but runs no .pth inside it, so this environment's editable install stays invisible).
    # Not --system-site-packages: from a virtual environment that is the base interpreter's, with
    # another torch or none.
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], env=env).stdout
    Path(purelib.strip(), "parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", str(wheel)],
         cwd=tmp_path, env=env, timeout=600)
    code = textwrap.dedent("""
        import torch, fused_resnet
        from fused_resnet import _backend, ops
        assert "site-packages" in fused_resnet.__file__, fused_resnet.__file__
        assert _backend.unavailable_reason("native", "cpu") is None, _backend.unavailable_reason("native", "cpu")
        x = torch.randn(2, 4, 5, 5)
        with fused_resnet.use_backend("native"), fused_resnet.trace_dispatch() as log:
            out = ops.add_relu(x, x)
        assert log == [("bn_add_relu", "native")], log
        assert torch.equal(out, torch.relu(x + x))
        print("ok", fused_resnet.__version__)
    """)
    # From an empty directory, so that the source tree cannot shadow the installed package.
    result = _run([str(python), "-c", code], cwd=tmp_path, env=env, timeout=600)
    assert "ok" in result.stdout

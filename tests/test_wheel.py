"""The wheel: `pip wheel . --no-build-isolation` builds one; it requires exactly the torch it was built
against, and installed into a fresh virtual environment (seeing the running torch) it imports from
there with the native backend working, runs a fused model like the unfused one, and refuses another
torch with a clear message.

Slow the first time (it compiles the extension); reuses build/ afterwards (CI builds the extension
just before, so there it only packs and installs)."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

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
    # Both libraries: the ops (no Python in it, docs/design.md decision 7) and the pybind module linking it.
    assert "fused_resnet/_C_ops.so" in names, names
    assert any(n.startswith("fused_resnet/_C.") and n.endswith(".so") for n in names), names
    assert not any(n.startswith("csrc/") for n in names)
    # A compiled extension: the tag names the interpreter and platform, never py3-none-any.
    assert "-none-any" not in wheel.name and "linux" in wheel.name, wheel.name


def test_wheel_requires_the_torch_it_was_built_against(wheel):
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert f"torch=={torch.__version__.split('+')[0]}" in requires, requires


@pytest.fixture(scope="module")
def venv_python(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment that sees this one's torch, with the wheel installed."""
    tmp_path = tmp_path_factory.mktemp("venv")
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
    return python


def _run_installed(python: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` run by the wheel's environment from an empty directory (the source tree cannot shadow
    the installed package), PYTHONPATH unset."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return _run([str(python), "-c", textwrap.dedent(code)], cwd=cwd, env=env, timeout=600)


def test_wheel_installs_and_runs_native(venv_python, tmp_path):
    code = """
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
    """
    assert "ok" in _run_installed(venv_python, code, tmp_path).stdout


def test_wheel_runs_a_fused_model_like_the_unfused_one(venv_python, tmp_path):
    code = """
        import copy, torch, fused_resnet
        from fused_resnet._tolerances import assert_close
        from fused_resnet.small_resnet import small_resnet
        assert "site-packages" in fused_resnet.__file__, fused_resnet.__file__
        torch.manual_seed(0)
        plain = small_resnet(fused=False)
        fused = fused_resnet.fuse(copy.deepcopy(plain))
        x = torch.randn(4, 3, 16, 16)
        with fused_resnet.trace_dispatch() as log, torch.no_grad():
            assert_close(fused.eval()(x), plain.eval()(x), torch.float32, name="eval")
        assert log and {backend for _, backend in log} == {"native"}, log
        plain.double().train(), fused.double().train()  # training, to the fp64 bar of the parity tests
        assert_close(fused(x.double()), plain(x.double()), tol=1e-9, name="train")
        print("ok")
    """
    assert "ok" in _run_installed(venv_python, code, tmp_path).stdout


def test_wheel_refuses_another_torch_with_a_clear_message(venv_python, tmp_path):
    built = torch.__version__.split("+")[0]
    code = """
        import torch
        torch.__version__ = "2.0.0"  # what another torch reports
        import fused_resnet
        from fused_resnet import _backend, ops
        print("reason:", _backend.unavailable_reason("native", "cpu"))
        try:
            ops.add_relu(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3))
        except RuntimeError as exc:
            print("error:", exc)
    """
    out = _run_installed(venv_python, code, tmp_path).stdout
    message = f"the extension was built against torch {built} but torch 2.0.0 is running"
    assert f"reason: {message}" in out, out
    assert f"error: fused_resnet: the ops need the compiled extension: {message}" in out and "build it" in out, out

"""The library fused_resnet/_C_ops.so (docs/design.md, decision 7): it needs no Python (no libpython or
libtorch_python among its NEEDED entries), ``torch.ops.load_library`` loads it where fused_resnet cannot
be imported, and then the ops exist with the schemas of ``_library.SCHEMAS`` (generated from them at build
time), run their native kernels and autograd, and say clearly what needs Python. Imported normally,
Python defines no op again and checks the library's schemas; a library with other schemas is refused."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fused_resnet
from fused_resnet import _extension, _library

from _isolated import run_without_fused_resnet

C_OPS = Path(fused_resnet.__file__).parent / "_C_ops.so"
pytestmark = pytest.mark.skipif(_extension.C is None, reason=f"extension not loaded: {_extension.LOAD_ERROR}")


def _expected_schemas() -> dict[str, str]:
    return {name: str(torch._C.parse_schema(f"fused_resnet::{name}{schema}")).split("::", 1)[1]
            for name, schema in _library.SCHEMAS.items()}


def test_ops_library_needs_no_python():
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    dynamic = subprocess.run(["readelf", "-d", str(C_OPS)], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any(n.startswith("libtorch_cpu") for n in needed), needed
    assert not [n for n in needed if n.startswith(("libpython", "libtorch_python"))], needed
    module = next(Path(fused_resnet.__file__).parent.glob("_C.*.so"))
    dynamic = subprocess.run(["readelf", "-d", str(module)], capture_output=True, text=True, check=True).stdout
    assert "[_C_ops.so]" in dynamic and "$ORIGIN" in dynamic, dynamic  # the pybind module loads the library


def test_the_library_defines_the_schemas_of_SCHEMAS_and_python_adds_none():
    assert _extension.defined_schemas("fused_resnet") == _expected_schemas()
    assert _library._lib.kind == "FRAGMENT"  # fakes and Python kernels only: the defs are the library's


def test_load_library_without_python_package(tmp_path):
    """Where fused_resnet cannot be imported: torch.ops.load_library defines the ops, the native kernels and
    C++ autograd run, and a call that needs a Python backend (float64) says so."""
    run_without_fused_resnet(f"""
        import ctypes
        torch.ops.load_library({str(C_OPS)!r})
        prefix = "fused_resnet::"
        names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)]
        got = {{n[len(prefix):]: str(torch._C._get_schema(n, "")).split("::", 1)[1] for n in names}}
        assert got == {_expected_schemas()!r}, got
        version = ctypes.CDLL({str(C_OPS)!r}).fused_resnet_torch_version
        version.restype = ctypes.c_char_p  # what a C++ loader checks against its torch
        assert version().decode() == torch.__version__.split("+")[0], version()
        torch.manual_seed(0)
        y, res = torch.randn(2, 4, 5, 5, requires_grad=True), torch.randn(2, 4, 5, 5, requires_grad=True)
        scale, shift = torch.rand(4) + 0.5, torch.randn(4)
        out = torch.ops.fused_resnet.bn_add_relu(y, scale, shift, res, None, None, True)
        ref = torch.relu(y * scale[:, None, None] + shift[:, None, None] + res)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        grad = torch.randn_like(out)
        got_y, got_res = torch.autograd.grad(out, (y, res), grad)
        ref_y, ref_res = torch.autograd.grad(ref, (y, res), grad)
        torch.testing.assert_close(got_y, ref_y), torch.testing.assert_close(got_res, ref_res)
        try:
            torch.ops.fused_resnet.bn_add_relu(y.double(), None, None, None, None, None, True)
        except RuntimeError as exc:
            assert "no Python is here" in str(exc) and "import fused_resnet" in str(exc), exc
        else:
            raise AssertionError("float64 ran without Python")
        print("ok")
    """, cwd=tmp_path)


def test_a_library_with_other_schemas_is_refused(tmp_path):
    """Built from other sources (an in-place build not redone after SCHEMAS changed): the ops refuse to run,
    with the reason naming the op that differs."""
    code = textwrap.dedent("""
        import torch, fused_resnet
        from fused_resnet import _extension, _library, ops
        other = dict(_library.SCHEMAS, bn_add_relu="(Tensor y, Tensor? scale) -> Tensor")
        _extension.library("fused_resnet", other)
        assert _extension.C is None and "bn_add_relu" in _extension.LOAD_ERROR, _extension.LOAD_ERROR
        assert "bn_add_relu" in fused_resnet._backend.unavailable_reason("native", "cpu")
        try:
            ops.add_relu(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3))
        except RuntimeError as exc:
            assert "differ from fused_resnet/_library.py's SCHEMAS" in str(exc) and "build" in str(exc), exc
        else:
            raise AssertionError("no error")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr

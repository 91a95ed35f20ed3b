"""Run Python code in a process that sees this torch but not fused_resnet (the checkout, an editable
install's finder, PYTHONPATH): what a deployment target without the package looks like.

``python -I -S``: no environment variables, no user site, no ``site`` (so no ``.pth`` file runs, the
editable install's among them), then only the directories torch and its dependencies live in. The
code itself checks that ``fused_resnet`` cannot be found before it does anything."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

PRELUDE = """
import importlib.util, sys
sys.path[:0] = {paths!r}
assert importlib.util.find_spec("fused_resnet") is None, "fused_resnet is importable here"
import torch
assert not hasattr(torch.ops.fused_resnet, "conv_bias_act"), "fused_resnet's ops are registered here"
"""


def torch_site_dirs() -> list[str]:
    """The site directories of this interpreter that hold torch and its dependencies (not the checkout)."""
    torch_dir = str(Path(torch.__file__).resolve().parents[1])
    others = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")) and p != torch_dir]
    return [torch_dir] + others


def run_without_fused_resnet(code: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``code`` (after the prelude above) with this interpreter, isolated; fail with its output."""
    source = PRELUDE.format(paths=torch_site_dirs()) + textwrap.dedent(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = subprocess.run([sys.executable, "-I", "-S", "-c", source], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"isolated run failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result

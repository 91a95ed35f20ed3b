"""The ``triton`` backend's choice between torch's conv and the implicit-GEMM one: the modes, both
paths against the reference, the decision cache, and measuring once (never during a graph capture)."""

from __future__ import annotations

import pytest
import torch
from _triton_cases import (
    _compare,
    _conv_args,
    _poison,  # noqa: F401  (autouse fixture)
    _run,
    _vec,
)

from fused_resnet import reference

pytest.importorskip("triton")
from fused_resnet.backends.triton import _choice, _tiling


@pytest.fixture(autouse=True)
def _mode_restored():
    """Each test leaves the conv path as ``FUSED_RESNET_TRITON_CONV`` set it (read at import)."""
    yield
    _choice.set_mode(None)


def test_choice_modes(monkeypatch):
    """``set_mode`` (``FUSED_RESNET_TRITON_CONV`` at import) forces a path; ``auto`` off a GPU takes
    torch's conv; a bad value is a ValueError naming the variable, from the setter or the first call."""
    calls = []

    def fake_gemm(*args):
        calls.append("gemm")
        return "gemm"

    monkeypatch.setattr(_choice, "_gemm_kernel", lambda kernel: (fake_gemm, lambda *a: True))
    args = (torch.zeros(1),)
    for mode, expected in (("gemm", fake_gemm), ("torch", None), ("auto", None)):
        _choice.set_mode(mode)
        chosen = _choice.choose("conv_stats", args, torch_fn=len)
        assert chosen is (expected or len), mode
    with pytest.raises(ValueError, match="FUSED_RESNET_TRITON_CONV"):
        _choice.set_mode("bogus")
    assert _choice.mode() == "auto"  # unchanged by the refused value
    monkeypatch.setenv(_choice.MODE_ENV, "bogus")
    _choice.set_mode(None)  # what an import with that variable does
    with pytest.raises(ValueError, match="FUSED_RESNET_TRITON_CONV"):
        _choice.choose("conv_stats", args, torch_fn=len)
    monkeypatch.setenv(_choice.MODE_ENV, "gemm")
    _choice.set_mode(None)
    assert _choice.mode() == "gemm"
    monkeypatch.setattr(_choice, "_gemm_kernel", lambda kernel: (fake_gemm, lambda *a: False))
    assert _choice.choose("conv_stats", args, torch_fn=len) is len  # unsupported args: torch's conv


@pytest.mark.parametrize("mode", ["torch", "gemm"])
def test_both_conv_paths_match_reference(mode, monkeypatch):
    """Each conv path through the registered kernels (the GEMM one where ``_conv_gemm`` has it)."""
    _choice.set_mode(mode)
    ran = []
    real_choose = _choice.choose

    def spy(kernel, args, torch_fn):
        fn = real_choose(kernel, args, torch_fn)
        ran.append((kernel, "torch" if fn is torch_fn else "gemm"))
        return fn

    monkeypatch.setattr(_choice, "choose", spy)
    device = "cpu" if _tiling.INTERPRETED else "cuda"
    args = _conv_args("3x3s2", torch.float32, "nhwc", device)
    _compare(_run("conv_stats", *args), reference.conv_stats(*args), torch.float32, ("y", "mean", "var"))
    y, mean, _ = reference.conv_stats(*args)
    x, scale, shift, in_relu, weight, *conv = args
    bargs = (torch.randn_like(y), _vec(y.shape[1], device), _vec(y.shape[1], device), x, scale, shift, in_relu,
             weight, y, mean, *conv, [True, True, True])
    _compare(_run("conv_stats_backward", *bargs), reference.conv_stats_backward(*bargs), torch.float32,
             ("grad_x", "grad_scale", "grad_shift", "grad_w"))
    cargs = (x, weight, _vec(weight.shape[0], device), torch.randn_like(y), *conv, True)
    _compare(_run("conv_bias_act", *cargs), (reference.conv_bias_act(*cargs),), torch.float32, ("out",))
    out = reference.conv_bias_act(*cargs)
    cbargs = (torch.randn_like(out), x, weight, out, True, *conv, [True, True, True, True])
    _compare(_run("conv_bias_act_backward", *cbargs), reference.conv_bias_act_backward(*cbargs), torch.float32,
             ("grad_x", "grad_w", "grad_bias", "grad_res"))
    expected = []
    for kernel, kargs in (("conv_stats", args), ("conv_stats_backward", bargs), ("conv_bias_act", cargs),
                          ("conv_bias_act_backward", cbargs)):
        gemm = _choice._gemm_kernel(kernel)
        expected.append((kernel, "gemm" if mode == "gemm" and gemm is not None and gemm[1](*kargs) else "torch"))
    assert ran == expected


def test_choice_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv(_choice.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(_choice, "_decisions", None)
    _choice._store("H100|k|shape", {"path": "gemm", "torch_ms": 2.0, "gemm_ms": 1.0})
    assert (tmp_path / "choices.json").exists()
    monkeypatch.setattr(_choice, "_decisions", None)  # a fresh process reads it back
    assert _choice.decision_records()["H100|k|shape"]["path"] == "gemm"
    assert _choice.decisions() == ["H100|k|shape -> gemm (torch 2.000 ms, gemm 1.000 ms)"]


@pytest.mark.cuda
def test_choice_measures_once_and_not_during_capture(tmp_path, monkeypatch):
    monkeypatch.setenv(_choice.CACHE_ENV, str(tmp_path))
    _choice.set_mode("auto")
    monkeypatch.setattr(_choice, "_decisions", None)
    if _choice._gemm_kernel("conv_stats") is None:
        pytest.skip("no implicit-GEMM conv_stats to choose from")
    args = _conv_args("3x3s1_odd", torch.float16, "nhwc", "cuda")
    _run("conv_stats", *args)
    assert len(_choice.decisions()) == 1
    _run("conv_stats", *args)
    assert len(_choice.decisions()) == 1
    other = _conv_args("3x3s2", torch.float16, "nhwc", "cuda")
    _choice.set_mode("torch")
    _run("conv_stats", *other)  # autotunes the Triton kernels for this shape (never inside a capture)
    _choice.set_mode("auto")
    assert len(_choice.decisions()) == 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _run("conv_stats", *other)
    assert len(_choice.decisions()) == 1

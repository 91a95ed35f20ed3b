"""Shared setup of the ``triton`` backend's kernel tests (``test_triton_backend_*.py``).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``conftest`` sets
``TRITON_INTERPRET=1``), in fp32 and fp16; bf16 and the real compiled kernels run in the
``cuda``-marked tests. Every call goes through the registered op under ``use_backend("triton")``
and ``trace_dispatch()`` proves the Triton kernel ran; every allocation the kernels make is
poisoned with NaN first (the autouse ``_poison`` fixture), so an element left unwritten fails.
"""

from __future__ import annotations

import pytest
import torch

import fused_resnet
from fused_resnet._tolerances import assert_close

pytest.importorskip("triton")
from fused_resnet.backends.triton import _tiling

ops = torch.ops.fused_resnet
if _tiling.INTERPRETED:
    DEVICES = [pytest.param("cpu", id="interp")]
else:
    DEVICES = [pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# (N, C_in, H, W, C_out, k, stride, pad): odd sizes, stride 2, 70 output channels (more than one
# 64-channel block), a 1x1 strided conv; N=1 for the eval-mode (conv_bias_act) case.
CONVS = {
    "3x3s1_odd": (2, 5, 9, 7, 70, 3, 1, 1),
    "3x3s2": (2, 6, 11, 10, 12, 3, 2, 1),
    "1x1s2": (3, 8, 7, 9, 10, 1, 2, 0),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every tensor allocated with torch.empty/empty_like during a test starts as NaN (or -1)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


def _act(shape, dtype, layout, device, offset=0.0):
    return (torch.randn(shape, device=device) + offset).to(dtype).contiguous(memory_format=LAYOUTS[layout])


def _vec(c, device, positive=False):
    v = torch.randn(c, device=device)
    return v.abs() + 0.5 if positive else v


def _run(kernel, *args):
    with fused_resnet.use_backend("triton"), fused_resnet.trace_dispatch() as log:
        out = getattr(ops, kernel)(*args)
    assert (kernel, "triton") in log, log
    return out if isinstance(out, (tuple, list)) else (out,)


def _layout(t):
    """The strides of ``t``'s dims of size > 1 (a size-1 dim's stride is arbitrary)."""
    return [st for st, sz in zip(t.stride(), t.shape) if sz > 1]


def _compare(outs, refs, dtype, names):
    for out, ref, name in zip(outs, refs, names):
        if ref is None:
            assert out.numel() == 0, f"{name}: computed but not asked for"
            continue
        assert out.shape == ref.shape and out.dtype == ref.dtype, name
        if out.dim() == 4:
            assert _layout(out) == _layout(ref), f"{name}: layout {out.stride()} vs {ref.stride()}"
        assert_close(out, ref, dtype, name=name)


def _conv_args(case, dtype, layout, device, prologue=True, relu=True):
    n, cin, h, w, cout, k, s, p = CONVS[case]
    x = _act((n, cin, h, w), dtype, layout, device)
    weight = (torch.randn(cout, cin, k, k, device=device) / (cin * k * k) ** 0.5).to(dtype)
    scale = _vec(cin, device, positive=True) if prologue else None
    shift = _vec(cin, device) if prologue else None
    return x, scale, shift, relu and prologue, weight, [s, s], [p, p], [1, 1], 1

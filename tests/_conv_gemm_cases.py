"""Shared setup of the Triton implicit-GEMM convolution tests (``test_triton_conv_gemm_*.py``).

Without a GPU the kernels run under Triton's interpreter on CPU tensors (conftest sets
``TRITON_INTERPRET=1``): shapes are tiny because the interpreter pays per program and per operation.
Every output the kernels allocate is poisoned with NaN first (the autouse ``_poison`` fixture), so an
element a kernel forgets to write fails; fp32 is compared without TF32 (``_strict_fp32``), and on a GPU
the unmarked tests run one small config per kernel (``_one_config_on_gpu``). Each test module imports
the three fixtures.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from fused_resnet._tolerances import assert_close
from fused_resnet.backends.triton import _conv_gemm_common as common

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ONE = (1, 1)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every floating tensor allocated through torch.empty/empty_like/new_empty starts as NaN."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: nan(new_empty(self, *a, **k)))


@pytest.fixture(autouse=True)
def _one_config_on_gpu(request):
    """On a GPU the small shapes of the unmarked tests run one config each (autotuning every one of
    them would cost minutes of compiles); the cuda-marked tests choose their configs themselves."""
    if DEV != "cuda" or request.node.get_closest_marker("cuda") is not None:
        yield
        return
    with _forced(_SMALL_CONFIGS):
        yield


# One modest config per kernel (the wgrad kernel has no GROUP_M): fits every dtype, fp32 on FMA units too.
_SMALL_CONFIGS = {"fwd": common.make_config(64, 64, 32, 4, 3, GROUP_M=8),
                  "dgrad": common.make_config(64, 64, 32, 4, 3, GROUP_M=8),
                  "wgrad": common.make_config(64, 64, 32, 4, 3)}


@contextlib.contextmanager
def _forced(configs):
    with contextlib.ExitStack() as stack:
        for name, config in configs.items():
            stack.enter_context(common.forced_config(name, config))
        yield


@pytest.fixture(autouse=True)
def _strict_fp32():
    """fp32 comparisons at the fp32 tolerance: no TF32 in the kernels nor in cuDNN's reference."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def _act(shape, dtype, channels_last, device=DEV):
    x = torch.randn(shape, device=device).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _vec(c, positive=False, device=DEV):
    v = torch.rand(c, device=device) + 0.5 if positive else torch.randn(c, device=device)
    return v


def _check_all(got, want, dtype, names):
    assert len(got) == len(want)
    for g, w, name in zip(got, want, names):
        if w is None:
            assert g is None, f"{name}: expected None"
            continue
        assert g is not None, f"{name}: missing"
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} vs {w.dtype}"
        if g.dim() == 4 and not name.startswith("grad_w"):  # activations follow _layout's rule
            assert g.stride() == w.stride() or g.shape[1] == 1, f"{name}: strides {g.stride()} vs {w.stride()}"
        assert_close(g, w, dtype, name=name)


# (kernel, stride, padding, C_in, C_out, H, W, N): 1x1/3x3/7x7, stride 1/2, odd sizes, channels not
# multiples of the tiles; the 7x7 case is the ResNet stem's (3 input channels).
CONV_SHAPES = [
    (1, 1, 0, 5, 20, 5, 7, 2),
    (3, 1, 1, 6, 20, 7, 5, 2),
    (3, 2, 1, 5, 12, 7, 6, 2),
    (1, 2, 0, 6, 10, 7, 7, 2),
    (7, 2, 3, 3, 8, 7, 6, 1),
]
SHAPE_IDS = [f"k{k}s{s}" for k, s, *_ in CONV_SHAPES]


def _conv_args(shape, dtype, channels_last):
    k, s, p, c_in, c_out, h, w, n = shape
    x = _act((n, c_in, h, w), dtype, channels_last)
    weight = torch.randn(c_out, c_in, k, k, device=DEV).to(dtype) * (1.0 / (c_in * k * k) ** 0.5)
    if channels_last:
        weight = weight.to(memory_format=torch.channels_last)
    return x, weight, (s, s), (p, p)


PROLOGUES = {"none": (False, False, False), "bn_relu": (True, True, True), "shift_relu": (False, True, True),
             "scale": (True, False, False)}

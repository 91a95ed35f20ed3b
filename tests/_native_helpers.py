"""Shared setup of the native-backend tests: skip (or, in CI, fail) when the extension is not
built, random inputs in a given dtype and layout, and output poisoning."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import fused_resnet
from fused_resnet import _backend

REASON = _backend.unavailable_reason("native", "cpu")
# CI builds the extension first and sets this, so that a broken build fails instead of skipping.
REQUIRED = os.environ.get("FUSED_RESNET_REQUIRE_NATIVE") == "1"


def require_native():
    """Module-level guard for the native tests."""
    if REASON is None:
        return
    if REQUIRED:
        raise RuntimeError(f"FUSED_RESNET_REQUIRE_NATIVE=1 but the native backend is unavailable: {REASON}")
    pytest.skip(f"native backend unavailable: {REASON}", allow_module_level=True)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["nchw", "nhwc"]


def device_params():
    devices = [pytest.param("cpu")]
    devices.append(pytest.param("cuda", marks=pytest.mark.cuda))
    return devices


def skip_unless_native(device: str):
    reason = _backend.unavailable_reason("native", device)
    if reason is not None and device == "cuda" and torch.cuda.is_available():
        pytest.fail(f"a GPU is present but the native CUDA kernels are unavailable: {reason}")
    if reason is not None:
        pytest.skip(reason)


def act(shape, dtype, layout, device, *, positive_bias: float = 0.0) -> torch.Tensor:
    """A fresh random activation (never zeros) in ``dtype`` and ``layout``."""
    t = (torch.randn(shape, device=device) + positive_bias).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else t.contiguous()


def per_channel(c: int, device, *, around: float = 0.0) -> torch.Tensor:
    return torch.randn(c, device=device) * 0.5 + around


@contextlib.contextmanager
def no_tf32():
    """fp32 convolutions and matmuls in true fp32 (no TF32) inside, the flags as they were after.

    Not ``monkeypatch.setattr``: ``torch.backends.cuda.matmul`` serves ``allow_tf32`` from ``__getattr__``
    (no instance or class attribute), so the monkeypatch of pytest 9.2 (not 9.0) records it as absent and its undo
    calls ``delattr``, which fails (an AttributeError at every teardown). Plain get/set works on every torch."""
    flags = [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]
    saved = [getattr(obj, name) for obj, name in flags]
    try:
        for obj, name in flags:
            setattr(obj, name, False)
        yield
    finally:
        for (obj, name), value in zip(flags, saved):
            setattr(obj, name, value)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every tensor the native ops allocate starts as NaN: an unwritten element fails the test.
    On a GPU, fp32 convolutions run in true fp32 (no TF32), in the kernels and the reference."""
    monkeypatch.setenv("FUSED_RESNET_NATIVE_POISON", "1")
    with no_tf32():
        yield


def layout_of(t: torch.Tensor) -> str:
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return "nhwc"
    return "nchw"


class _NativeKernels:
    """The native kernels as the tests call them: each public op under ``use_backend("native")``,
    checked to have run there (``trace_dispatch``), with the gradients a backward op did not
    compute (empty placeholders) given back as None, the reference's convention."""

    def __getattr__(self, name):
        op = getattr(torch.ops.fused_resnet, name)

        def call(*args):
            with fused_resnet.use_backend("native"), fused_resnet.trace_dispatch() as log:
                out = op(*args)
            assert log and all(backend == "native" for _, backend in log), log
            if name.endswith("_backward"):
                return tuple(None if g.numel() == 0 else g for g in out)
            return out

        return call


native_kernels = _NativeKernels()

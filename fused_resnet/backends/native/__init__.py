"""The ``native`` backend: the compiled extension ``fused_resnet._C`` (sources in ``csrc/``).

Its kernels are registered in C++ as the CPU and CUDA kernels of the public ops, behind the
backend choice (``csrc/routed_ops.h``): they are not called from Python, so this module only says
where they can run and adds the serving path that ``prepare_for_inference`` binds (``_onednn.py``).
Convolutions are ATen's (oneDNN / cuDNN); every pass around them (prologue, batch statistics,
BN-apply + residual + ReLU epilogue, their backward reductions) is a fused, vectorised kernel of the
extension. Covered: float32, bfloat16 and float16 activations, NCHW and channels_last, any conv
geometry ATen supports; float64 goes to the reference.
"""

from __future__ import annotations

import torch

from ... import _extension
from ..._backend import register_backend, register_kernel

_C, LOAD_ERROR = _extension.C, _extension.LOAD_ERROR
WITH_CUDA = bool(getattr(_C, "WITH_CUDA", False))
# Why the build left the CUDA kernels out, as setup.py recorded it (older builds did not record it).
CUDA_SKIP_REASON = None if _C is None or WITH_CUDA else getattr(
    _C, "CUDA_SKIP_REASON",
    "CPU-only torch or no CUDA toolkit at build time; rebuild with FORCE_CUDA=1 and a CUDA torch",
)


def availability(device_type: str) -> str | None:
    """None where the native kernels can run, else why not."""
    if _extension.LOAD_ERROR is not None:  # read now: _library may refuse the extension after this import
        return _extension.LOAD_ERROR
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if not WITH_CUDA:
            return f"the extension was built without CUDA kernels: {CUDA_SKIP_REASON}"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        return None
    return f"no native kernels for device type {device_type!r}"


register_backend("native", availability)


if _C is not None:
    from . import _onednn

    register_kernel("native", "prepack_conv", supports=_onednn.supports)(_onednn.prepack_conv)


def info_lines() -> list[str]:
    """What ``python -m fused_resnet info`` says about the extension."""
    if _extension.C is None:
        return [f"not loaded: {_extension.LOAD_ERROR}"]
    cuda = "yes" if WITH_CUDA else f"no ({CUDA_SKIP_REASON})"
    lines = [f"built against torch {getattr(_C, 'TORCH_VERSION', '?')}, CUDA kernels: {cuda}"]
    if not torch.backends.mkldnn.is_available():
        lines.append("CPU conv_bias_act: ATen convolution + fused epilogue (this torch has no oneDNN)")
    elif not torch.backends.mkldnn.enabled:
        lines.append("CPU conv_bias_act: ATen convolution + fused epilogue (torch.backends.mkldnn.enabled is False)")
    else:
        from ._onednn import route_bounds

        bounds = route_bounds()
        lines.append(
            "CPU serving after fused_resnet.prepare_for_inference, float32: oneDNN's fused conv (post-ops) on "
            f"weights reordered once, for convs of >= {bounds.onednn_nchw} (NCHW) / {bounds.onednn_nhwc} "
            f"(channels_last) multiply-adds on this CPU ({torch.backends.cpu.get_cpu_capability()}; "
            "FUSED_RESNET_ONEDNN_MIN_MACS sets both); smaller ones without a residual: ATen's conv with the "
            "folded bias inside, the activation in place; 1x1 convs as one GEMM (see _onednn.py)"
        )
    return lines

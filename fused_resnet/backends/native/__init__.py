"""The ``native`` backend: the compiled extension ``fused_resnet._C`` (sources in ``csrc/``).

The extension defines the kernel ops ``torch.ops.fused_resnet_native.*`` (schemas in
``csrc/ops.cpp``, CPU and CUDA implementations in ``csrc/cpu`` and ``csrc/cuda``); this module
loads it, registers their fakes (``_fakes.py``) and one thin wrapper per kernel. The kernels have the
signatures and semantics of ``fused_resnet.reference`` and return None for gradients not asked
for. Convolutions are ATen's (oneDNN / cuDNN); every pass around them (prologue, batch
statistics, BN-apply + residual + ReLU epilogue, their backward reductions) is a fused,
vectorised kernel of the extension.

Covered: float32, bfloat16 and float16 activations, NCHW and channels_last, any conv geometry
ATen supports. float64 goes to the reference (``supports`` is False).

Loading never raises: a missing or broken extension leaves the backend registered but
unavailable, with the reason given by ``python -m fused_resnet info``.
"""

from __future__ import annotations

import torch

from ..._backend import register_backend, register_kernel

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`"


def _load():
    """The extension module and None, or None and why it could not be loaded."""
    try:
        from ... import _C
    except ModuleNotFoundError as exc:
        return None, f"the extension fused_resnet._C is not built ({exc}); {_BUILD_HINT}"
    except Exception as exc:  # noqa: BLE001  (undefined symbols, ABI mismatch, missing libraries: any reason)
        return None, (
            f"the extension fused_resnet._C failed to load ({type(exc).__name__}: {exc}); rebuild it against "
            f"torch {torch.__version__}: {_BUILD_HINT}"
        )
    built = getattr(_C, "TORCH_VERSION", None)
    running = torch.__version__.split("+")[0]
    if built is not None and built != running:
        return None, f"the extension was built against torch {built} but torch {running} is running; {_BUILD_HINT}"
    if not hasattr(torch.ops.fused_resnet_native, "conv_stats"):
        return None, "the extension loaded but registered no fused_resnet_native ops"
    return _C, None


_C, LOAD_ERROR = _load()
WITH_CUDA = bool(getattr(_C, "WITH_CUDA", False))
# Why the build left the CUDA kernels out, as setup.py recorded it (older builds did not record it).
CUDA_SKIP_REASON = None if _C is None or WITH_CUDA else getattr(
    _C, "CUDA_SKIP_REASON",
    "CPU-only torch or no CUDA toolkit at build time; rebuild with FORCE_CUDA=1 and a CUDA torch",
)


def availability(device_type: str) -> str | None:
    """None where the native kernels can run, else why not."""
    if LOAD_ERROR is not None:
        return LOAD_ERROR
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


def _ok(t: torch.Tensor) -> bool:
    return t.dtype in _DTYPES


if _C is not None:
    from . import _fakes

    _fakes.register()
    _ops = torch.ops.fused_resnet_native

    @register_kernel("native", "conv_stats", supports=lambda x, *args: _ok(x))
    def conv_stats(x, in_scale, in_shift, in_relu, weight, stride, padding, dilation, groups):
        return _ops.conv_stats(x, in_scale, in_shift, in_relu, weight, stride, padding, dilation, groups)

    @register_kernel("native", "conv_stats_backward", supports=lambda grad_y, grad_mean, grad_var, x, *args: _ok(x))
    def conv_stats_backward(grad_y, grad_mean, grad_var, x, in_scale, in_shift, in_relu, weight, y, mean,
                            stride, padding, dilation, groups, output_mask):
        return _ops.conv_stats_backward(grad_y, grad_mean, grad_var, x, in_scale, in_shift, in_relu, weight, y, mean,
                                        stride, padding, dilation, groups, output_mask)

    @register_kernel("native", "bn_add_relu", supports=lambda y, *args: _ok(y))
    def bn_add_relu(y, scale, shift, residual, res_scale, res_shift, relu):
        return _ops.bn_add_relu(y, scale, shift, residual, res_scale, res_shift, relu)

    @register_kernel("native", "bn_add_relu_backward", supports=lambda grad_out, y, *args: _ok(y))
    def bn_add_relu_backward(grad_out, y, scale, shift, residual, res_scale, res_shift, relu, output_mask):
        return _ops.bn_add_relu_backward(grad_out, y, scale, shift, residual, res_scale, res_shift, relu, output_mask)

    @register_kernel("native", "conv_bias_act", supports=lambda x, *args: _ok(x))
    def conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu):
        return _ops.conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu)

    @register_kernel("native", "conv_bias_act_backward", supports=lambda grad_out, x, *args: _ok(x))
    def conv_bias_act_backward(grad_out, x, weight, out, relu, stride, padding, dilation, groups, output_mask):
        return _ops.conv_bias_act_backward(grad_out, x, weight, out, relu, stride, padding, dilation, groups,
                                           output_mask)

    @register_kernel("native", "update_running_stats_")
    def update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
        _ops.update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)


def packed_weight_count() -> int:
    """How many conv weights the CPU ``conv_bias_act`` holds reordered for oneDNN (0 without the
    extension). Serving without autograd in float32, each conv's (folded) weight is reordered once
    and kept until that tensor dies or changes in place (``csrc/cpu/onednn_conv.h``)."""
    return torch.ops.fused_resnet_native.packed_weight_count() if _C is not None else 0


def clear_packed_weights() -> None:
    """Drop every cached oneDNN weight reorder (they are rebuilt on the next call that needs one)."""
    if _C is not None:
        torch.ops.fused_resnet_native.clear_packed_weights()


def info_lines() -> list[str]:
    """What ``python -m fused_resnet info`` says about the extension."""
    if _C is None:
        return [f"not loaded: {LOAD_ERROR}"]
    cuda = "yes" if WITH_CUDA else f"no ({CUDA_SKIP_REASON})"
    lines = [f"built against torch {getattr(_C, 'TORCH_VERSION', '?')}, CUDA kernels: {cuda}"]
    if not torch.backends.mkldnn.is_available():
        lines.append("CPU conv_bias_act: ATen convolution + fused epilogue (this torch has no oneDNN)")
    elif not torch.backends.mkldnn.enabled:
        lines.append("CPU conv_bias_act: ATen convolution + fused epilogue (torch.backends.mkldnn.enabled is False)")
    else:
        lines.append(
            "CPU conv_bias_act without autograd, float32: oneDNN post-ops with cached weight reorders for convs "
            "of >= FUSED_RESNET_ONEDNN_MIN_MACS multiply-adds (default 2^23); "
            f"{packed_weight_count()} weights cached now"
        )
    return lines

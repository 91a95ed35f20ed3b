"""The ``triton`` backend: every non-GEMM step of the fused ops in Triton kernels.

Convolutions run on torch's convolution (cuDNN on a GPU) or, where measured faster, on the
implicit-GEMM Triton kernels of ``_conv_gemm`` (``_choice``). Around the conv, Triton does the
rest, fused: the prologue ``act(x * scale + shift)``, the BN statistics (``_stats``: two-level,
shifted Chan merge, deterministic), their backward (``_stats_backward``), BN apply + residual +
ReLU and its backward (``_elementwise``), the running-statistics update (``_running_stats``).

Availability: on ``cuda`` when Triton imports and a GPU is present; on ``cpu`` only when
``TRITON_INTERPRET=1`` was set before Triton was imported (the kernels then run in Triton's
interpreter on CPU tensors: slow, for tests). Activations fp16/fp32 (and bf16 on a GPU: the
interpreter rounds bf16 stores differently); fp64 falls back to the reference.
"""

from __future__ import annotations

import torch

from ..._backend import register_backend, register_kernel

NAME = "triton"

try:
    import triton  # noqa: F401
except Exception as _exc:  # noqa: BLE001 (any import failure means "not here", with its reason)
    _IMPORT_ERROR: str | None = f"{type(_exc).__name__}: {_exc}"
else:
    _IMPORT_ERROR = None


def availability(device_type: str) -> str | None:
    """None when the backend runs on ``device_type`` here, else why not and how to get it."""
    if _IMPORT_ERROR is not None:
        return f"triton does not import ({_IMPORT_ERROR}); install it with `pip install triton` (Linux)"
    from ._tiling import INTERPRETED

    if device_type == "cuda":
        if INTERPRETED:
            return "TRITON_INTERPRET=1 is set: Triton runs on the CPU interpreter; unset it to use the GPU"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch (a CUDA build of torch and a GPU are needed)"
        return None
    if device_type == "cpu":
        if INTERPRETED:
            return None
        return (
            "Triton kernels need a CUDA GPU; for CPU tensors (slow, for tests) set TRITON_INTERPRET=1 "
            "before importing triton"
        )
    return f"Triton kernels run on CUDA GPUs, not on {device_type}"


register_backend(NAME, availability)

if _IMPORT_ERROR is None:
    from . import _choice, _conv_torch, _elementwise, _gate, _running_stats
    from ._tiling import INTERPRETED, as_mergeable

    _ACTIVATION_DTYPES = (torch.float16, torch.float32)

    def _activation_ok(t: torch.Tensor) -> bool:
        if t.device.type == "cuda":
            return not INTERPRETED and t.dtype in _ACTIVATION_DTYPES + (torch.bfloat16,)
        return INTERPRETED and t.device.type == "cpu" and t.dtype in _ACTIVATION_DTYPES

    def _first_ok(*args) -> bool:
        return _activation_ok(args[0])

    def _x_ok(*args) -> bool:  # conv_stats_backward: the activation is its 4th argument
        return _activation_ok(args[3])

    def _conv_kernel(kernel: str, supports):
        torch_fn = getattr(_conv_torch, kernel)

        def run(*args):
            return _choice.choose(kernel, args, torch_fn)(*args)

        run.__name__ = run.__qualname__ = kernel
        run.__doc__ = f"``reference.{kernel}``: torch/cuDNN conv + Triton, or the implicit-GEMM kernel (``_choice``)."
        register_kernel(NAME, kernel, supports=supports)(run)

    _conv_kernel("conv_stats", _first_ok)
    _conv_kernel("conv_stats_backward", _x_ok)
    _conv_kernel("conv_bias_act", _first_ok)
    _conv_kernel("conv_bias_act_backward", _x_ok)

    @register_kernel(NAME, "bn_add_relu", supports=_first_ok)
    def bn_add_relu(y, scale, shift, residual, res_scale, res_shift, act, gate=None):
        """``reference.bn_add_relu`` in one pass (``_elementwise``; a gate through ``_gate``)."""
        if gate is not None:
            return _gate.forward(bn_add_relu, y, scale, shift, residual, res_scale, res_shift, act, gate)
        residual = as_mergeable(residual) if residual is not None else None
        return _elementwise.bn_add_relu(as_mergeable(y), scale, shift, residual, res_scale, res_shift, act)

    def _res_shift_grad(sum_dz, shared: bool, needed: bool):
        # The same sum as grad_shift's: a copy when both are returned, so no two outputs share memory.
        if not needed:
            return None
        return sum_dz.clone() if shared else sum_dz

    @register_kernel(NAME, "bn_add_relu_backward", supports=lambda grad_out, y, *rest: _activation_ok(y))
    def bn_add_relu_backward(grad_out, y, scale, shift, residual, res_scale, res_shift, act, output_mask,
                             gate=None):
        """``reference.bn_add_relu_backward`` in one pass plus a tiny ``[T, C]`` sum (``_elementwise``;
        a gate through ``_gate``)."""
        if gate is not None:
            return _gate.backward(bn_add_relu_backward, grad_out, y, scale, shift, residual, res_scale, res_shift,
                                  act, output_mask, gate)
        need_y, need_affine, need_res, need_res_affine = output_mask
        has_res = residual is not None
        need_res_affine = need_res_affine and has_res
        grad_y, grad_res, sum_dz, sum_dzy, sum_dzr = _elementwise.bn_add_relu_backward(
            as_mergeable(grad_out), as_mergeable(y), scale, shift, as_mergeable(residual) if has_res else None,
            res_scale, res_shift, act,
            need_dy=need_y, need_dres=need_res and has_res,
            sum_dz=(need_affine and shift is not None) or (need_res_affine and res_shift is not None),
            sum_dzy=need_affine and scale is not None,
            sum_dzr=need_res_affine and res_scale is not None,
        )
        return (
            grad_y,
            sum_dzy,
            sum_dz if need_affine and shift is not None else None,
            grad_res,
            sum_dzr,
            _res_shift_grad(sum_dz, need_affine and shift is not None, need_res_affine and res_shift is not None),
            None,
        )

    register_kernel(NAME, "update_running_stats_", supports=_running_stats.supports)(
        _running_stats.update_running_stats_
    )


def info_lines() -> list[str]:
    """Lines for ``python -m fused_resnet info``: the conv path in force and every cached choice."""
    if _IMPORT_ERROR is not None:
        return [availability("cuda")]
    lines = [
        f"triton conv path: {_choice.mode()} ({_choice.MODE_ENV}); choices cached in {_choice.cache_path()}",
        _choice.gemm_status(),
    ]
    return lines + [f"  {line}" for line in _choice.decisions()]

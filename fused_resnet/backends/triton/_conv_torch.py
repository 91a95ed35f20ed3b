"""The conv kernels on torch's convolution (cuDNN on a GPU) with every non-GEMM step in Triton.

Passes over activation-sized tensors, per call (``x`` conv input, ``y`` conv output):

- ``conv_stats``: prologue ``act(x * in_scale + in_shift)`` (1 read of ``x``, 1 write of a
  transient freed right after the conv: never saved), the conv, the statistics (1 read of ``y``).
  Eager: BN apply, ReLU (2 read+write passes) before the conv, then ``var_mean`` (1-2 passes).
- ``conv_stats_backward``: ``g`` from the statistics' gradients (read ``grad_y``, ``y``, write
  ``g``), the prologue's transient again if the weight gradient needs it (read ``x``, write), the
  conv backward, then one pass for the prologue's backward (read ``grad_a``, ``x``; write
  ``grad_x`` and reduce ``sum(dz)``, ``sum(dz * x)``). Eager: ~10 elementwise/reduction passes.
- ``conv_bias_act``: the conv, then bias + residual + activation in one pass (read ``y``, residual;
  write ``out``). Eager: 3 passes.
- ``conv_bias_act_backward``: one pass (read ``grad_out``, ``out``; write ``dz``; reduce
  ``sum(dz)``), the conv backward; ``dz`` is also the residual's gradient.

Conventions follow ``reference.py``: convolutions in the activation dtype on a GPU and in fp32
elsewhere (the interpreter runs on CPU tensors), outputs in the main input's layout. The only
copies besides these are of exotic views (``_tiling.as_mergeable``) and a layout change when
the conv returns its output in a layout other than the input's.
"""

from __future__ import annotations

import torch

from ..._conv_backward import convolution_backward
from ..._layout import empty_activation, output_memory_format
from . import _elementwise
from ._stats import batch_mean_var
from ._stats_backward import stats_grad
from ._tiling import as_mergeable

_aten = torch.ops.aten


def _conv_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) and x.device.type != "cuda" else x.dtype


def _finish(t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return t.to(dtype or like.dtype).contiguous(memory_format=output_memory_format(like))


def _has_prologue(in_scale, in_shift, in_act) -> bool:
    return in_scale is not None or in_shift is not None or bool(in_act)


def _prologue(x, in_scale, in_shift, in_act) -> torch.Tensor:
    """The conv's input ``act(x * in_scale + in_shift)`` in the conv dtype (a transient)."""
    if not _has_prologue(in_scale, in_shift, in_act):
        return x.to(_conv_dtype(x))
    return _elementwise.bn_add_relu(x, in_scale, in_shift, None, None, None, in_act, out_dtype=_conv_dtype(x))


def _conv(a, weight, stride, padding, dilation, groups):
    return _aten.convolution(a, weight.to(a.dtype), None, stride, padding, dilation, False, [0, 0], groups)


def conv_stats(x, in_scale, in_shift, in_act, weight, stride, padding, dilation, groups):
    """``reference.conv_stats`` (see the module docstring for the passes)."""
    x = as_mergeable(x)
    y = _conv(_prologue(x, in_scale, in_shift, in_act), weight, stride, padding, dilation, groups)
    y = as_mergeable(_finish(y, x))
    mean, var = batch_mean_var(y)
    return y, mean, var


def conv_stats_backward(grad_y, grad_mean, grad_var, x, in_scale, in_shift, in_act, weight, y, mean,
                        stride, padding, dilation, groups, output_mask):
    """``reference.conv_stats_backward`` (see the module docstring for the passes)."""
    need_x, need_affine, need_w = output_mask
    x, y, grad_y = as_mergeable(x), as_mergeable(y), as_mergeable(grad_y)
    cdt = _conv_dtype(x)
    prologue = _has_prologue(in_scale, in_shift, in_act)
    need_affine = need_affine and (in_scale is not None or in_shift is not None)
    need_input_grad = need_x or need_affine
    if not (need_input_grad or need_w):
        return None, None, None, None
    g = stats_grad(grad_y, grad_mean, grad_var, y, mean, cdt)
    # The conv backward reads its input only for the weight gradient, else just its shape.
    a = _prologue(x, in_scale, in_shift, in_act) if need_w else x.to(cdt)
    grad_a, grad_w = convolution_backward(g, a, weight.to(cdt), stride, padding, dilation, groups, need_input_grad,
                                          need_w)
    del g, a
    grad_x = grad_scale = grad_shift = None
    if need_input_grad and not prologue:
        grad_x = _finish(grad_a, x) if need_x else None
    elif need_input_grad:
        grad_x, _, grad_shift, grad_scale, _ = _elementwise.bn_add_relu_backward(
            as_mergeable(grad_a), x, in_scale, in_shift, None, None, None, in_act, need_dy=need_x,
            sum_dz=need_affine and in_shift is not None, sum_dzy=need_affine and in_scale is not None,
        )
    return grad_x, grad_scale, grad_shift, _finish(grad_w, weight) if need_w else None


def conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, act):
    """``reference.conv_bias_act``: cuDNN conv, then one Triton pass for bias + residual + activation."""
    x = as_mergeable(x)
    z = _conv(x.to(_conv_dtype(x)), weight, stride, padding, dilation, groups)
    if bias is None and residual is None and not act:
        return _finish(z, x)
    z = as_mergeable(z)
    out = empty_activation(x, z.shape)
    residual = as_mergeable(residual) if residual is not None else None
    return _elementwise.bn_add_relu(z, None, bias, residual, None, None, act, out=out)


def conv_bias_act_backward(grad_out, x, weight, out, act, stride, padding, dilation, groups, output_mask):
    """``reference.conv_bias_act_backward``: one Triton pass for the activation's derivative (at the
    saved output, or the pre-activation given as ``out``), ``sum(dz)`` and the residual's gradient,
    then the conv backward."""
    need_x, need_w, need_bias, need_res = output_mask
    x, out, grad_out = as_mergeable(x), as_mergeable(out), as_mergeable(grad_out)
    cdt = _conv_dtype(x)
    need_conv = need_x or need_w
    dz = grad_res = grad_bias = None
    if act or need_bias or need_res:
        # dz doubles as the residual's gradient when the conv dtype is the residual's own.
        separate_res = need_res and cdt != out.dtype
        dz, grad_res, grad_bias, _, _ = _elementwise.bn_add_relu_backward(
            grad_out, out, None, None, None, None, None, act, dy_dtype=cdt if need_conv else out.dtype,
            need_dy=need_conv or (need_res and not separate_res), sum_dz=need_bias,
        )
        if separate_res:
            grad_res = _elementwise.bn_add_relu_backward(grad_out, out, None, None, None, None, None, act)[0]
        elif need_res:
            grad_res = dz
    elif need_conv:
        dz = grad_out.to(cdt)
    grad_x = grad_w = None
    if need_conv:
        grad_x, grad_w = convolution_backward(dz, x.to(cdt), weight.to(cdt), stride, padding, dilation, groups,
                                              need_x, need_w)
        grad_x = _finish(grad_x, x) if need_x else None
        grad_w = _finish(grad_w, weight) if need_w else None
    return grad_x, grad_w, grad_bias, grad_res

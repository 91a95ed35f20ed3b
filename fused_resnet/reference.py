"""Pure-PyTorch reference of every fused op: the ground truth for tests and the fallback backend.

Each function has exactly the signature of the backend kernel it stands for (see ``_library.SCHEMAS``)
and follows the conventions of ``_layout.py``. Arithmetic on statistics and elementwise terms runs
in fp32 (fp64 for fp64 tensors). Convolutions run in the activation dtype on CUDA, where cuDNN
accumulates in fp32, and are upcast to fp32 on other devices, where half-precision convolution is
slow or missing: either way the reference is as accurate as ``nn.Conv2d`` in the same dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _activation
from ._conv_backward import convolution_backward
from ._layout import channel_view, output_memory_format, stat_dtype

_HALF = (torch.float16, torch.bfloat16)
_REDUCE_DIMS = (0, 2, 3)


def _conv_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in _HALF and t.device.type != "cuda" else t.dtype


def _affine(t: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """``t * scale + shift`` per channel, in the statistics dtype."""
    out = t.to(stat_dtype(t.dtype))
    if scale is not None:
        out = out * channel_view(scale)
    if shift is not None:
        out = out + channel_view(shift)
    return out


def _prologue(x, in_scale, in_shift, in_act):
    """The conv input the kernel sees: ``act(x * in_scale + in_shift)``, in the conv dtype."""
    if in_scale is None and in_shift is None and not in_act:
        return x.to(_conv_dtype(x))
    return _activation.apply(_affine(x, in_scale, in_shift), in_act).to(_conv_dtype(x))


def _finish(t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return t.to(dtype or like.dtype).contiguous(memory_format=output_memory_format(like))


def conv_stats(
    x: torch.Tensor,
    in_scale: torch.Tensor | None,
    in_shift: torch.Tensor | None,
    in_act: int,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = conv(act(x * in_scale + in_shift), weight)`` (``in_act``: an activation code of ``_activation``)
    and the batch mean and biased variance of ``y`` per output channel (computed from ``y`` as stored, in
    fp32/fp64)."""
    a = _prologue(x, in_scale, in_shift, in_act)
    y = F.conv2d(a, weight.to(a.dtype), None, stride, padding, dilation, groups)
    y = _finish(y, x)
    var, mean = torch.var_mean(y.to(stat_dtype(y.dtype)), dim=_REDUCE_DIMS, correction=0)
    return y, mean, var


def conv_stats_backward(
    grad_y, grad_mean, grad_var, x, in_scale, in_shift, in_act, weight, y, mean,
    stride, padding, dilation, groups, output_mask,
):
    """Gradients of ``conv_stats`` w.r.t. ``(x, in_scale, in_shift, weight)``.

    The statistics' gradients fold into the conv output's: ``g = grad_y + grad_mean / M +
    2 * grad_var * (y - mean) / M`` with ``M = N * H_out * W_out``; then the conv backward, and
    the prologue's activation derivative (at the recomputed pre-activation) and affine chain rule.
    ``output_mask`` selects ``(x, scale/shift, weight)``; gradients not asked for (or of absent
    inputs) are None.
    """
    need_x, need_affine, need_w = output_mask
    sdt = stat_dtype(y.dtype)
    count = y.numel() // y.shape[1]
    centred = y.to(sdt) - channel_view(mean)
    g = grad_y.to(sdt) + channel_view(grad_mean / count) + channel_view(2.0 * grad_var / count) * centred
    a = _prologue(x, in_scale, in_shift, in_act)
    grad_a, grad_w = convolution_backward(g.to(a.dtype), a, weight.to(a.dtype), stride, padding, dilation, groups,
                                          need_x or need_affine, need_w)
    grad_x = grad_scale = grad_shift = None
    if need_x or need_affine:
        dz = grad_a.to(sdt)
        if in_act:
            dz = _activation.grad(dz, _affine(x, in_scale, in_shift), in_act)
        if need_x:
            grad_x = _finish(dz * channel_view(in_scale) if in_scale is not None else dz, x)
        if need_affine:
            if in_scale is not None:
                grad_scale = (dz * x.to(sdt)).sum(_REDUCE_DIMS)
            if in_shift is not None:
                grad_shift = dz.sum(_REDUCE_DIMS)
    grad_w = _finish(grad_w, weight) if need_w else None
    return grad_x, grad_scale, grad_shift, grad_w


def _gate_view(gate: torch.Tensor, sdt: torch.dtype) -> torch.Tensor:
    """A ``bn_add_relu`` gate ((N, C) or (N, C, 1, 1)) as an (N, C, 1, 1) factor in ``sdt``."""
    return gate.to(sdt).reshape(gate.shape[0], gate.shape[1], 1, 1)


def _tail_preactivation(y, scale, shift, residual, res_scale, res_shift, gate=None):
    z = _affine(y, scale, shift)
    if gate is not None:
        z = z * _gate_view(gate, z.dtype)
    if residual is not None:
        z = z + _affine(residual, res_scale, res_shift)
    return z


def bn_add_relu(y, scale, shift, residual, res_scale, res_shift, act, gate=None):
    """``act(gate * (y * scale + shift) + (residual * res_scale + res_shift))`` in ``y``'s dtype and
    layout (``act``: an activation code of ``_activation``); every scale/shift/residual/gate term is
    optional (absent means 1, 0, no residual and 1). ``gate`` is a per-(sample, channel) factor of
    shape (N, C) or (N, C, 1, 1) (SE, DropPath)."""
    z = _tail_preactivation(y, scale, shift, residual, res_scale, res_shift, gate)
    return _finish(_activation.apply(z, act), y)


def bn_add_relu_backward(grad_out, y, scale, shift, residual, res_scale, res_shift, act, output_mask, gate=None):
    """Gradients of ``bn_add_relu`` w.r.t. ``(y, scale, shift, residual, res_scale, res_shift, gate)``;
    ``output_mask`` selects ``(y, scale/shift/gate, residual, res_scale/res_shift)``; the activation's
    derivative is taken at the pre-activation recomputed from the inputs. The gate's gradient has the
    gate's shape and dtype."""
    need_y, need_affine, need_res, need_res_affine = output_mask
    sdt = stat_dtype(y.dtype)
    dz = grad_out.to(sdt)
    if act:
        dz = _activation.grad(dz, _tail_preactivation(y, scale, shift, residual, res_scale, res_shift, gate), act)
    out = [None] * 7
    if residual is not None:
        if need_res:
            out[3] = _finish(dz * channel_view(res_scale) if res_scale is not None else dz, residual)
        if need_res_affine:
            if res_scale is not None:
                out[4] = (dz * residual.to(sdt)).sum(_REDUCE_DIMS)
            if res_shift is not None:
                out[5] = dz.sum(_REDUCE_DIMS)
    if gate is not None:
        if need_affine:  # d/dgate: the BN's output summed over each (sample, channel) plane
            out[6] = (dz * _affine(y, scale, shift)).sum((2, 3)).reshape(gate.shape).to(gate.dtype)
        dz = dz * _gate_view(gate, sdt)  # the rest sees the gated gradient
    if need_y:
        out[0] = _finish(dz * channel_view(scale) if scale is not None else dz, y)
    if need_affine:
        if scale is not None:
            out[1] = (dz * y.to(sdt)).sum(_REDUCE_DIMS)
        if shift is not None:
            out[2] = dz.sum(_REDUCE_DIMS)
    return tuple(out)


def conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, act):
    """``act(conv(x, weight) + bias + residual)``: the inference block with BN folded into
    ``weight`` and ``bias``; ``bias`` (fp32/fp64) and ``residual`` are optional."""
    a = x.to(_conv_dtype(x))
    z = F.conv2d(a, weight.to(a.dtype), None, stride, padding, dilation, groups).to(stat_dtype(x.dtype))
    if bias is not None:
        z = z + channel_view(bias)
    if residual is not None:
        z = z + residual.to(z.dtype)
    return _finish(_activation.apply(z, act), x)


def conv_bias_act_backward(grad_out, x, weight, out, act, stride, padding, dilation, groups, output_mask):
    """Gradients of ``conv_bias_act`` w.r.t. ``(x, weight, bias, residual)``, the activation's
    derivative taken at ``out``: the saved output (ReLU, ReLU6, LeakyReLU: the same mask as the
    pre-activation's) or the pre-activation (any activation; SiLU and Hardswish need it, recomputed by
    the op's autograd); ``output_mask`` selects them."""
    need_x, need_w, need_bias, need_res = output_mask
    sdt = stat_dtype(x.dtype)
    dz = grad_out.to(sdt)
    if act:
        dz = _activation.grad(dz, out.to(sdt), act)
    a = x.to(_conv_dtype(x))
    grad_x, grad_w = convolution_backward(dz.to(a.dtype), a, weight.to(a.dtype), stride, padding, dilation, groups,
                                          need_x, need_w)
    return (
        _finish(grad_x, x) if need_x else None,
        _finish(grad_w, weight) if need_w else None,
        dz.sum(_REDUCE_DIMS) if need_bias else None,
        _finish(dz, out) if need_res else None,
    )


def bn_finalize(mean, var, weight, bias, eps):
    """A BatchNorm's per-channel ``scale = weight / sqrt(var + eps)`` and ``shift = bias - mean *
    scale`` in ``mean``'s dtype, so that ``bn(y) = y * scale + shift``; ``weight``/``bias`` may be None."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(mean.dtype)
    shift = -(mean * scale) if bias is None else bias.to(mean.dtype) - mean * scale
    return scale, shift


def bn_finalize_backward(grad_scale, grad_shift, mean, var, weight, eps, output_mask):
    """Gradients of :func:`bn_finalize` w.r.t. ``(mean, var, weight, bias)``: with ``invstd =
    (var + eps)^-1/2`` and ``g = grad_scale - grad_shift * mean`` (scale reaches the loss directly and
    through ``shift``), ``grad_mean = -grad_shift * scale``, ``grad_var = -g * weight * invstd^3 / 2``,
    ``grad_weight = g * invstd``, ``grad_bias = grad_shift``; None where not asked for or absent."""
    need_mean, need_var, need_weight, need_bias = output_mask
    invstd = torch.rsqrt(var + eps)
    w = None if weight is None else weight.to(mean.dtype)
    g = grad_scale - grad_shift * mean
    return (
        -(grad_shift * (invstd if w is None else invstd * w)) if need_mean else None,
        (g if w is None else g * w) * invstd ** 3 * -0.5 if need_var else None,
        (g * invstd).to(weight.dtype) if need_weight and weight is not None else None,
        grad_shift.clone() if need_bias else None,
    )


def conv_bn_from(conv_stats_fn, update_fn, x, in_scale, in_shift, in_act, weight, bn_weight, bn_bias,
                 running_mean, running_var, num_batches_tracked, momentum, eps, stride, padding, dilation, groups):
    """:func:`conv_bn` built from a backend's ``conv_stats`` and ``update_running_stats_`` kernels (the
    Python backends compose theirs this way; the per-channel finalize is the same everywhere)."""
    y, mean, var = conv_stats_fn(x, in_scale, in_shift, in_act, weight, stride, padding, dilation, groups)
    if running_mean is not None and running_var is not None:
        update_fn(running_mean, running_var, num_batches_tracked, mean, var, y.numel() // y.shape[1], momentum)
    return (y, *bn_finalize(mean, var, bn_weight, bn_bias, eps), mean, var)


def conv_bn(x, in_scale, in_shift, in_act, weight, bn_weight, bn_bias, running_mean, running_var,
            num_batches_tracked, momentum, eps, stride, padding, dilation, groups):
    """A training conv+BN in one op: ``y, mean, var = conv_stats(...)``, the running statistics
    updated in place (when given), and the BN's ``scale, shift = bn_finalize(mean, var, bn_weight,
    bn_bias, eps)``; returns ``(y, scale, shift, mean, var)``: the deferred BN ``y * scale + shift``
    and the batch statistics its backward needs."""
    return conv_bn_from(conv_stats, update_running_stats_, x, in_scale, in_shift, in_act, weight, bn_weight,
                        bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps, stride, padding,
                        dilation, groups)


def conv_bn_backward_from(conv_stats_backward_fn, grad_y, grad_scale, grad_shift, x, in_scale, in_shift, in_act,
                          weight, bn_weight, y, mean, var, eps, stride, padding, dilation, groups, output_mask):
    """:func:`conv_bn_backward` built from a backend's ``conv_stats_backward``."""
    need_x, need_affine, need_w, need_bn = output_mask
    grad_mean, grad_var, grad_bn_weight, grad_bn_bias = bn_finalize_backward(
        grad_scale, grad_shift, mean, var, bn_weight, eps, [True, True, need_bn, need_bn])
    grad_x, grad_in_scale, grad_in_shift, grad_w = conv_stats_backward_fn(
        grad_y, grad_mean, grad_var, x, in_scale, in_shift, in_act, weight, y, mean, stride, padding, dilation,
        groups, [need_x, need_affine, need_w])
    return grad_x, grad_in_scale, grad_in_shift, grad_w, grad_bn_weight, grad_bn_bias


def conv_bn_backward(grad_y, grad_scale, grad_shift, x, in_scale, in_shift, in_act, weight, bn_weight, y, mean, var,
                     eps, stride, padding, dilation, groups, output_mask):
    """Gradients of :func:`conv_bn` w.r.t. ``(x, in_scale, in_shift, weight, bn_weight, bn_bias)`` from
    those of ``(y, scale, shift)``: :func:`bn_finalize_backward` gives the statistics' gradients, which
    :func:`conv_stats_backward` folds into the conv output's. ``output_mask`` selects ``(x,
    in_scale/in_shift, weight, bn_weight/bn_bias)``; ``grad_bn_weight`` comes in ``bn_weight``'s
    dtype, ``grad_bn_bias`` in the statistics dtype."""
    return conv_bn_backward_from(conv_stats_backward, grad_y, grad_scale, grad_shift, x, in_scale, in_shift, in_act,
                                 weight, bn_weight, y, mean, var, eps, stride, padding, dilation, groups, output_mask)


def update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    """In place, exactly as ``nn.BatchNorm2d`` in training: ``num_batches_tracked += 1``, then
    ``running = (1 - f) * running + f * batch`` with ``f = momentum``, or ``1 / num_batches_tracked``
    (cumulative average) when ``momentum`` is None, and the unbiased variance
    ``var * count / (count - 1)`` into ``running_var``. Computed in fp64, as ATen does on the CPU."""
    num_batches_tracked.add_(1)
    factor = 1.0 / num_batches_tracked.double() if momentum is None else momentum
    unbiased = var.double() * (count / (count - 1))
    running_mean.copy_(factor * mean.double() + (1 - factor) * running_mean.double())
    running_var.copy_(factor * unbiased + (1 - factor) * running_var.double())


def prepack_conv(weight, bias, stride, padding, dilation, groups):
    """A serving form of a folded conv (``inference.prepare_for_inference``): a callable
    ``(x, residual, act) -> Tensor | None`` that a backend may offer (the native one reorders
    the weight for oneDNN once). The reference has none: its folded convs run ``conv_bias_act``."""
    return None

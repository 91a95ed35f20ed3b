"""Autograd for the fused ops: what each forward saves, and which backward op it calls.

What is saved is the memory story of the library. ``conv_stats`` saves its raw input ``x``, the
prologue's per-channel ``in_scale``/``in_shift``, the weight, its output ``y`` and ``mean``: the
normalised, ReLU'd activation that fed the convolution is recomputed in backward, never kept.
``bn_add_relu`` saves its inputs (already kept by the ops around it) and recomputes the ReLU
mask. ``conv_bias_act`` saves its input, and its output only when it applies a ReLU (the mask).

Each forward records the backend asked for when it ran (``use_backend`` is a context variable,
which autograd's CUDA threads do not see) and its backward op runs on that backend. Under
``torch.compile`` this is the backend in force when the graph was traced.
"""

from __future__ import annotations

import torch

from . import _backend
from ._library import NAMESPACE

_ops = getattr(torch.ops, NAMESPACE)


def _grad_or_none(t: torch.Tensor, needed: bool):
    # Gradients not asked for come back from the backward ops as empty placeholders.
    return t if needed else None


def _conv_stats_setup(ctx, inputs, output):
    x, in_scale, in_shift, in_relu, weight, stride, padding, dilation, groups = inputs
    y, mean, _ = output
    ctx.save_for_backward(x, in_scale, in_shift, weight, y, mean)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.in_relu = in_relu
    ctx.backend = _backend.get_backend()


def _conv_stats_backward(ctx, grad_y, grad_mean, grad_var):
    x, in_scale, in_shift, weight, y, mean = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1] or need[2], need[4]]
    grad_x, grad_scale, grad_shift, grad_w = _ops.conv_stats_backward(
        grad_y, grad_mean, grad_var, x, in_scale, in_shift, ctx.in_relu, weight, y, mean, *ctx.conv, mask, ctx.backend
    )
    return (
        _grad_or_none(grad_x, need[0]),
        _grad_or_none(grad_scale, need[1]),
        _grad_or_none(grad_shift, need[2]),
        None,
        _grad_or_none(grad_w, need[4]),
        None, None, None, None,
    )


def _bn_add_relu_setup(ctx, inputs, output):
    y, scale, shift, residual, res_scale, res_shift, relu = inputs
    ctx.save_for_backward(y, scale, shift, residual, res_scale, res_shift)
    ctx.relu = relu
    ctx.backend = _backend.get_backend()


def _bn_add_relu_backward(ctx, grad_out):
    saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1] or need[2], need[3], need[4] or need[5]]
    grads = _ops.bn_add_relu_backward(grad_out, *saved, ctx.relu, mask, ctx.backend)
    return tuple(_grad_or_none(g, need[i]) for i, g in enumerate(grads)) + (None,)


def _conv_bias_act_setup(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups, relu = inputs
    # The output is kept only for the ReLU mask: without ReLU, a caller may modify it in place.
    ctx.save_for_backward(x, weight, output if relu else None)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.relu = relu
    ctx.backend = _backend.get_backend()


def _conv_bias_act_backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x, grad_w, grad_bias, grad_res = _ops.conv_bias_act_backward(
        grad_out, x, weight, grad_out if out is None else out, ctx.relu, *ctx.conv, list(need[:4]), ctx.backend
    )
    return (
        _grad_or_none(grad_x, need[0]),
        _grad_or_none(grad_w, need[1]),
        _grad_or_none(grad_bias, need[2]),
        _grad_or_none(grad_res, need[3]),
        None, None, None, None, None,
    )


for _name, _backward, _setup in (
    ("conv_stats", _conv_stats_backward, _conv_stats_setup),
    ("bn_add_relu", _bn_add_relu_backward, _bn_add_relu_setup),
    ("conv_bias_act", _conv_bias_act_backward, _conv_bias_act_setup),
):
    torch.library.register_autograd(f"{NAMESPACE}::{_name}", _backward, setup_context=_setup)

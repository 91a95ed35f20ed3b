"""Fake (shape-only) implementations of the native kernel ops, for FakeTensor, torch.compile and
opcheck. They are the public ops' fakes (``fused_resnet._library``), which already encode each
kernel's output shapes, dtypes and layouts, with one difference of convention: a native kernel
returns None (an undefined tensor) for a gradient it does not compute, where the public op
returns an empty placeholder."""

from __future__ import annotations

import torch

from ... import _library

_NS = "fused_resnet_native"


def _keep(outputs, computed):
    return tuple(o if c else None for o, c in zip(outputs, computed))


def register() -> None:
    torch.library.register_fake(f"{_NS}::conv_stats")(_library._conv_stats_fake)
    torch.library.register_fake(f"{_NS}::bn_add_relu")(_library._bn_add_relu_fake)
    torch.library.register_fake(f"{_NS}::conv_bias_act")(_library._conv_bias_act_fake)

    @torch.library.register_fake(f"{_NS}::conv_stats_backward")
    def _conv_stats_backward(grad_y, grad_mean, grad_var, x, in_scale, in_shift, in_relu, weight, y, mean,
                             stride, padding, dilation, groups, output_mask):
        need_x, need_affine, need_w = output_mask
        out = _library._conv_stats_backward_fake(grad_y, grad_mean, grad_var, x, in_scale, in_shift, in_relu, weight,
                                                 y, mean, stride, padding, dilation, groups, output_mask)
        return _keep(out, (need_x, need_affine and in_scale is not None, need_affine and in_shift is not None, need_w))

    @torch.library.register_fake(f"{_NS}::bn_add_relu_backward")
    def _bn_add_relu_backward(grad_out, y, scale, shift, residual, res_scale, res_shift, relu, output_mask):
        need_y, need_affine, need_res, need_res_affine = output_mask
        out = _library._bn_add_relu_backward_fake(grad_out, y, scale, shift, residual, res_scale, res_shift, relu,
                                                  output_mask)
        has_res = residual is not None
        return _keep(out, (
            need_y, need_affine and scale is not None, need_affine and shift is not None, need_res and has_res,
            need_res_affine and has_res and res_scale is not None, need_res_affine and has_res and res_shift is not None,
        ))

    @torch.library.register_fake(f"{_NS}::conv_bias_act_backward")
    def _conv_bias_act_backward(grad_out, x, weight, out, relu, stride, padding, dilation, groups, output_mask):
        result = _library._conv_bias_act_backward_fake(grad_out, x, weight, out, relu, stride, padding, dilation,
                                                       groups, output_mask)
        return _keep(result, output_mask)

    @torch.library.register_fake(f"{_NS}::update_running_stats_")
    def _update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
        return None

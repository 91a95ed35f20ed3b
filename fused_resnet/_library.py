"""The ``fused_resnet`` operator library: every schema, its fake, and its Python kernels.

This is the one place where ops are declared (docs/design.md): setup.py generates the C++ definitions
of the compiled library ``_C_ops`` from SCHEMAS. The compiled extension (``_extension.py``) registers
their CPU and CUDA kernels, which check the arguments and choose the
backend in C++: native kernels run there; the reference and Triton backends are the Python
kernels here (:func:`python_kernel`, which picks the backend's function with ``_backend.select``
and runs it with autocast off: inputs were already cast by the functional layer). Autograd is the
extension's too (``csrc/autograd.cpp``); backward passes are ops of their own. On a device the
extension has no kernels for, the CompositeExplicitAutograd implementations below check the
arguments and run the Python kernels.

Conventions (``_layout.py``): activations are NCHW or channels_last, outputs follow the main
input's layout; per-channel tensors (scale, shift, mean, var, bias) are fp32, or fp64 for fp64
activations. Gradients that were not asked for come back as empty tensors.
"""

from __future__ import annotations

import torch

from . import _activation, _backend, _checks, _extension, reference
from ._kernel_call import fill as _fill, run as _run, unaliased as _unaliased
from ._layout import conv_output_size, empty_activation, stat_dtype

NAMESPACE = "fused_resnet"
_CONV = "int[2] stride, int[2] padding, int[2] dilation, int groups"
# Backward ops run on the backend their forward asked for (recorded at forward by csrc/autograd.cpp):
# the choice made with use_backend() is a context variable, unset on autograd's CUDA threads. "" (the
# default, for a direct call): the backend in force.
_BACKEND = 'str backend=""'

SCHEMAS = {
    # y = conv(act(x * in_scale + in_shift), weight); mean/var: biased batch statistics of y. Activation
    # codes (act, in_act; _activation.py): 0 none, 1 ReLU, 2 ReLU6, 3 SiLU, 4 Hardswish, 5 LeakyReLU(0.01),
    # 6 LeakyReLU(0.1).
    "conv_stats": f"(Tensor x, Tensor? in_scale, Tensor? in_shift, int in_act, Tensor weight, {_CONV})"
    " -> (Tensor y, Tensor mean, Tensor var)",
    "conv_stats_backward": "(Tensor grad_y, Tensor grad_mean, Tensor grad_var, Tensor x, Tensor? in_scale,"
    f" Tensor? in_shift, int in_act, Tensor weight, Tensor y, Tensor mean, {_CONV}, bool[3] output_mask,"
    f" {_BACKEND})"
    " -> (Tensor grad_x, Tensor grad_in_scale, Tensor grad_in_shift, Tensor grad_weight)",
    # out = act(gate * (y * scale + shift) + residual * res_scale + res_shift); act: an activation code
    # (0 none, 1 ReLU, 2 ReLU6, 3 SiLU, 4 Hardswish, 5/6 LeakyReLU); gate: per (sample, channel), shape (N, C)
    # or (N, C, 1, 1) (SE, DropPath), trailing with a default so that calls without it stay valid; its
    # gradient comes with scale/shift's (output_mask[1]), last, in its dtype.
    "bn_add_relu": "(Tensor y, Tensor? scale, Tensor? shift, Tensor? residual, Tensor? res_scale,"
    " Tensor? res_shift, int act, Tensor? gate=None) -> Tensor",
    "bn_add_relu_backward": "(Tensor grad_out, Tensor y, Tensor? scale, Tensor? shift, Tensor? residual,"
    f" Tensor? res_scale, Tensor? res_shift, int act, bool[4] output_mask, {_BACKEND}, Tensor? gate=None)"
    " -> (Tensor grad_y, Tensor grad_scale, Tensor grad_shift, Tensor grad_residual, Tensor grad_res_scale,"
    " Tensor grad_res_shift, Tensor grad_gate)",
    # out = act(conv(x, weight) + bias + residual): inference with BN folded into weight/bias. Its
    # backward's `out`: the output (ReLU, ReLU6, LeakyReLU) or the pre-activation (any act; SiLU, Hardswish
    # need it).
    "conv_bias_act": f"(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, {_CONV}, int act) -> Tensor",
    "conv_bias_act_backward": f"(Tensor grad_out, Tensor x, Tensor weight, Tensor out, int act, {_CONV},"
    f" bool[4] output_mask, {_BACKEND}) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias,"
    " Tensor grad_residual)",
    # A BN's scale = weight / sqrt(var + eps) and shift = bias - mean * scale (per channel, in mean's
    # dtype), so that bn(y) = y * scale + shift; one op forward and one backward (csrc/bn_finalize.cpp).
    "bn_finalize": "(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) -> (Tensor scale, Tensor shift)",
    "bn_finalize_backward": "(Tensor grad_scale, Tensor grad_shift, Tensor mean, Tensor var, Tensor? weight,"
    " float eps, bool[4] output_mask) -> (Tensor grad_mean, Tensor grad_var, Tensor grad_weight, Tensor grad_bias)",
    # A training conv+BN in one op (cuDNN frontend's conv -> stats -> BN-finalize graph): y = conv_stats' y,
    # the running statistics updated in place when given (as update_running_stats_), and the deferred BN's
    # scale/shift (as bn_finalize); mean/var: the batch statistics, not differentiable, kept for backward.
    "conv_bn": "(Tensor x, Tensor? in_scale, Tensor? in_shift, int in_act, Tensor weight, Tensor? bn_weight,"
    " Tensor? bn_bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked,"
    f" float? momentum, float eps, {_CONV}) -> (Tensor y, Tensor scale, Tensor shift, Tensor mean, Tensor var)",
    # One backward for all of it; output_mask: (x, in_scale/in_shift, weight, bn_weight/bn_bias).
    "conv_bn_backward": "(Tensor grad_y, Tensor grad_scale, Tensor grad_shift, Tensor x, Tensor? in_scale,"
    " Tensor? in_shift, int in_act, Tensor weight, Tensor? bn_weight, Tensor y, Tensor mean, Tensor var, float eps,"
    f" {_CONV}, bool[4] output_mask, {_BACKEND}) -> (Tensor grad_x, Tensor grad_in_scale, Tensor grad_in_shift,"
    " Tensor grad_weight, Tensor grad_bn_weight, Tensor grad_bn_bias)",
    # nn.BatchNorm2d's running-statistics update, in place; momentum None = cumulative average.
    "update_running_stats_": "(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!) num_batches_tracked,"
    " Tensor mean, Tensor var, SymInt count, float? momentum) -> ()",
}

# The compiled library defines them (setup.py generates its C++ definitions from SCHEMAS); Python only
# where it is not built, and a library built from other schemas is refused (_extension.library).
_lib = _extension.library(NAMESPACE, SCHEMAS)


def _impl(name: str):
    def register(fn):
        torch.library.impl(f"{NAMESPACE}::{name}", "CompositeExplicitAutograd", lib=_lib)(fn)
        return fn

    return register


def _fake(name: str):
    return torch.library.register_fake(f"{NAMESPACE}::{name}", lib=_lib)


# conv_stats ---------------------------------------------------------------------------------------


def _check_conv_stats(x, in_scale, in_shift, weight, stride, padding, dilation, groups):
    _checks.check_conv(x, weight, stride, padding, dilation, groups)
    _checks.check_per_channel("in_scale", in_scale, x.shape[1], x)
    _checks.check_per_channel("in_shift", in_shift, x.shape[1], x)


@_impl("conv_stats")
def _conv_stats(x, in_scale, in_shift, in_act, weight, stride, padding, dilation, groups):
    _activation.check("in_act", in_act)
    _extension.require()
    _check_conv_stats(x, in_scale, in_shift, weight, stride, padding, dilation, groups)
    return _run("conv_stats", x.device, x, in_scale, in_shift, in_act, weight, stride, padding, dilation, groups)


@_fake("conv_stats")
def _conv_stats_fake(x, in_scale, in_shift, in_act, weight, stride, padding, dilation, groups):
    _activation.check("in_act", in_act)
    _check_conv_stats(x, in_scale, in_shift, weight, stride, padding, dilation, groups)
    y = empty_activation(x, conv_output_size(x.shape, weight.shape, stride, padding, dilation))
    stats = x.new_empty(weight.shape[0], dtype=stat_dtype(x.dtype))
    return y, stats, torch.empty_like(stats)


@_impl("conv_stats_backward")
def _conv_stats_backward(grad_y, grad_mean, grad_var, x, in_scale, in_shift, in_act, weight, y, mean,
                         stride, padding, dilation, groups, output_mask, backend=""):
    grads = _run("conv_stats_backward", x.device, grad_y, grad_mean, grad_var, x, in_scale, in_shift, in_act,
                 weight, y, mean, stride, padding, dilation, groups, output_mask, backend=backend)
    return _fill(grads, (x, mean, mean, weight))


@_fake("conv_stats_backward")
def _conv_stats_backward_fake(grad_y, grad_mean, grad_var, x, in_scale, in_shift, in_act, weight, y, mean,
                              stride, padding, dilation, groups, output_mask, backend=""):
    need_x, need_affine, need_w = output_mask
    return (
        empty_activation(x, x.shape) if need_x else x.new_empty(0),
        torch.empty_like(in_scale) if need_affine and in_scale is not None else mean.new_empty(0),
        torch.empty_like(in_shift) if need_affine and in_shift is not None else mean.new_empty(0),
        torch.empty_like(weight) if need_w else weight.new_empty(0),
    )


# bn_add_relu --------------------------------------------------------------------------------------


def _check_bn_add_relu(y, scale, shift, residual, res_scale, res_shift, gate=None):
    _checks.check_activation("input", y)
    _checks.check_per_channel("scale", scale, y.shape[1], y)
    _checks.check_per_channel("shift", shift, y.shape[1], y)
    _checks.check_residual(residual, y, y.shape)
    if residual is None and (res_scale is not None or res_shift is not None):
        raise RuntimeError("fused_resnet: res_scale/res_shift given without a residual")
    _checks.check_per_channel("res_scale", res_scale, y.shape[1], y)
    _checks.check_per_channel("res_shift", res_shift, y.shape[1], y)
    _checks.check_gate(gate, y)


@_impl("bn_add_relu")
def _bn_add_relu(y, scale, shift, residual, res_scale, res_shift, act, gate=None):
    _activation.check("act", act)
    _extension.require()
    _check_bn_add_relu(y, scale, shift, residual, res_scale, res_shift, gate)
    return _run("bn_add_relu", y.device, y, scale, shift, residual, res_scale, res_shift, act, gate)


@_fake("bn_add_relu")
def _bn_add_relu_fake(y, scale, shift, residual, res_scale, res_shift, act, gate=None):
    _activation.check("act", act)
    _check_bn_add_relu(y, scale, shift, residual, res_scale, res_shift, gate)
    return empty_activation(y, y.shape)


@_impl("bn_add_relu_backward")
def _bn_add_relu_backward(grad_out, y, scale, shift, residual, res_scale, res_shift, act, output_mask,
                          backend="", gate=None):
    grads = _run("bn_add_relu_backward", y.device, grad_out, y, scale, shift, residual, res_scale, res_shift, act,
                 output_mask, gate, backend=backend)
    per_channel = grad_out.new_empty(0, dtype=stat_dtype(y.dtype))
    return _fill(grads, (y, per_channel, per_channel, y, per_channel, per_channel, per_channel))


@_fake("bn_add_relu_backward")
def _bn_add_relu_backward_fake(grad_out, y, scale, shift, residual, res_scale, res_shift, act, output_mask,
                               backend="", gate=None):
    need_y, need_affine, need_res, need_res_affine = output_mask
    def like(t, needed):
        return torch.empty_like(t) if needed and t is not None else y.new_empty(0, dtype=stat_dtype(y.dtype))

    return (
        empty_activation(y, y.shape) if need_y else y.new_empty(0),
        like(scale, need_affine),
        like(shift, need_affine),
        empty_activation(residual, residual.shape) if need_res and residual is not None else y.new_empty(0),
        like(res_scale, need_res_affine and residual is not None),
        like(res_shift, need_res_affine and residual is not None),
        torch.empty_like(gate) if need_affine and gate is not None else y.new_empty(0, dtype=stat_dtype(y.dtype)),
    )


# conv_bias_act ------------------------------------------------------------------------------------


def _check_conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups):
    _checks.check_conv(x, weight, stride, padding, dilation, groups)
    _checks.check_per_channel("bias", bias, weight.shape[0], x)
    if residual is not None:
        _checks.check_residual(residual, x, conv_output_size(x.shape, weight.shape, stride, padding, dilation))


@_impl("conv_bias_act")
def _conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, act):
    _activation.check("act", act)
    _extension.require()
    _check_conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups)
    return _run("conv_bias_act", x.device, x, weight, bias, residual, stride, padding, dilation, groups, act)


@_fake("conv_bias_act")
def _conv_bias_act_fake(x, weight, bias, residual, stride, padding, dilation, groups, act):
    _activation.check("act", act)
    _check_conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups)
    return empty_activation(x, conv_output_size(x.shape, weight.shape, stride, padding, dilation))


@_impl("conv_bias_act_backward")
def _conv_bias_act_backward(grad_out, x, weight, out, act, stride, padding, dilation, groups, output_mask,
                            backend=""):
    grads = _run("conv_bias_act_backward", x.device, grad_out, x, weight, out, act, stride, padding, dilation,
                 groups, output_mask, backend=backend)
    return _fill(grads, (x, weight, grad_out.new_empty(0, dtype=stat_dtype(x.dtype)), out))


@_fake("conv_bias_act_backward")
def _conv_bias_act_backward_fake(grad_out, x, weight, out, act, stride, padding, dilation, groups, output_mask,
                                 backend=""):
    need_x, need_w, need_bias, need_res = output_mask
    return (
        empty_activation(x, x.shape) if need_x else x.new_empty(0),
        torch.empty_like(weight) if need_w else weight.new_empty(0),
        x.new_empty(weight.shape[0], dtype=stat_dtype(x.dtype)) if need_bias else x.new_empty(0, dtype=stat_dtype(x.dtype)),
        empty_activation(out, out.shape) if need_res else out.new_empty(0),
    )


# update_running_stats_ ----------------------------------------------------------------------------


@_impl("update_running_stats_")
def _update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    _extension.require()
    if count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got {count}")
    _update_running_stats_kernel(running_mean, running_var, num_batches_tracked, mean, var, count, momentum, None)


def _update_running_stats_kernel(running_mean, running_var, num_batches_tracked, mean, var, count, momentum, backend):
    _run("update_running_stats_", mean.device, running_mean, running_var, num_batches_tracked, mean, var, count,
         momentum, backend=backend)
    # A kernel may write through raw pointers (Triton, CUDA), which PyTorch does not see: without
    # this, anything that keys on the version counter (autograd's saved-tensor checks, a caller's
    # memo) would take the old statistics for the current ones.
    for t in (running_mean, running_var, num_batches_tracked):
        if not t.is_inference():  # inference tensors have no version counter
            torch.autograd.graph.increment_version(t)


@_fake("bn_finalize")
def _bn_finalize_fake(mean, var, weight, bias, eps):
    return torch.empty_like(mean), torch.empty_like(mean)


@_fake("bn_finalize_backward")
def _bn_finalize_backward_fake(grad_scale, grad_shift, mean, var, weight, eps, output_mask):
    need_mean, need_var, need_weight, need_bias = output_mask
    def like(t, needed):
        return torch.empty_like(t) if needed else mean.new_empty(0)

    return (like(mean, need_mean), like(var, need_var), like(weight, need_weight and weight is not None),
            like(mean, need_bias))


@_fake("update_running_stats_")
def _update_running_stats_fake(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    return None


# conv_bn ------------------------------------------------------------------------------------------


def _check_conv_bn(x, in_scale, in_shift, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                   dilation, groups):
    _check_conv_stats(x, in_scale, in_shift, weight, stride, padding, dilation, groups)
    out_shape = conv_output_size(x.shape, weight.shape, stride, padding, dilation)
    for name, t in (("BN weight", bn_weight), ("BN bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and (t.dim() != 1 or t.shape[0] != weight.shape[0]):
            raise RuntimeError(f"fused_resnet: {name} must have shape ({weight.shape[0]},), got {tuple(t.shape)}")
    _checks.check_batch_statistics(out_shape, True)
    return out_shape


@_impl("conv_bn")
def _conv_bn(x, in_scale, in_shift, in_act, weight, bn_weight, bn_bias, running_mean, running_var,
             num_batches_tracked, momentum, eps, stride, padding, dilation, groups):
    _activation.check("in_act", in_act)
    _extension.require()
    _check_conv_bn(x, in_scale, in_shift, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                   dilation, groups)
    return _conv_bn_kernel(x, in_scale, in_shift, in_act, weight, bn_weight, bn_bias, running_mean, running_var,
                           num_batches_tracked, momentum, eps, stride, padding, dilation, groups, backend=None)


def _conv_bn_kernel(*args, backend):
    """The Python backends' conv_bn: their conv_stats and running-statistics kernels, then the finalize."""
    def conv_stats(*a):
        return _run("conv_stats", a[0].device, *a, backend=backend, record_as="conv_bn")

    def update(*a):
        _update_running_stats_kernel(*a, backend)

    return _unaliased(reference.conv_bn_from(conv_stats, update, *args), args)


@_fake("conv_bn")
def _conv_bn_fake(x, in_scale, in_shift, in_act, weight, bn_weight, bn_bias, running_mean, running_var,
                  num_batches_tracked, momentum, eps, stride, padding, dilation, groups):
    _activation.check("in_act", in_act)
    out_shape = _check_conv_bn(x, in_scale, in_shift, weight, bn_weight, bn_bias, running_mean, running_var, stride,
                               padding, dilation, groups)
    stats = x.new_empty(weight.shape[0], dtype=stat_dtype(x.dtype))
    return (empty_activation(x, out_shape), *(torch.empty_like(stats) for _ in range(4)))


@_impl("conv_bn_backward")
def _conv_bn_backward(grad_y, grad_scale, grad_shift, x, in_scale, in_shift, in_act, weight, bn_weight, y, mean,
                      var, eps, stride, padding, dilation, groups, output_mask, backend=""):
    def conv_stats_backward(*a):
        grads = _run("conv_stats_backward", x.device, *a, backend=backend or None, record_as="conv_bn_backward")
        return _fill(grads, (x, mean, mean, weight))

    grads = reference.conv_bn_backward_from(conv_stats_backward, grad_y, grad_scale, grad_shift, x, in_scale,
                                            in_shift, in_act, weight, bn_weight, y, mean, var, eps, stride, padding,
                                            dilation, groups, output_mask)
    return _unaliased(_fill(grads, (x, mean, mean, weight, mean, mean)), (grad_y, grad_scale, grad_shift))


@_fake("conv_bn_backward")
def _conv_bn_backward_fake(grad_y, grad_scale, grad_shift, x, in_scale, in_shift, in_act, weight, bn_weight, y, mean,
                           var, eps, stride, padding, dilation, groups, output_mask, backend=""):
    need_x, need_affine, need_w, need_bn = output_mask
    grad_x, grad_in_scale, grad_in_shift, grad_w = _conv_stats_backward_fake(
        grad_y, mean, mean, x, in_scale, in_shift, in_act, weight, y, mean, stride, padding, dilation, groups,
        [need_x, need_affine, need_w])
    return (grad_x, grad_in_scale, grad_in_shift, grad_w,
            torch.empty_like(bn_weight) if need_bn and bn_weight is not None else mean.new_empty(0),
            torch.empty_like(mean) if need_bn else mean.new_empty(0))


# The Python kernels the extension's backend choice calls ---------------------------------------------

_BACKWARD = {
    "conv_stats_backward": _conv_stats_backward,
    "bn_add_relu_backward": _bn_add_relu_backward,
    "conv_bias_act_backward": _conv_bias_act_backward,
    "conv_bn_backward": _conv_bn_backward,
}


def python_kernel(kernel: str, backend: str, *args):
    """Run ``kernel`` of the reference or Triton backend (``backend``; ``auto`` picks among the
    Python backends; ``""``: the one in force) on arguments the extension has checked; called from
    C++ (``csrc/router.h``)."""
    backend = backend or None
    if kernel == "bn_add_relu_backward":  # the schema's gate trails its backend
        return _bn_add_relu_backward(*args[:-1], backend, args[-1])
    if kernel in _BACKWARD:
        return _BACKWARD[kernel](*args, backend)
    if kernel == "update_running_stats_":
        return _update_running_stats_kernel(*args, backend)
    if kernel == "conv_bn":
        return _conv_bn_kernel(*args, backend=backend)
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    return _run(kernel, device, *args, backend=backend)


if _extension.C is not None:
    _extension.C._set_python_kernels(python_kernel)

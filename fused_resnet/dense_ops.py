"""Functional DenseNet block in training: concatenated skips with one shared feature buffer.

A dense block of ``L`` layers computes, from ``x_0`` (``C_0`` channels) and growth rate ``k``,

    h_l = conv1_l(relu(bn1_l(cat(x_0, ..., x_l))))        (1x1, the bottleneck, ``C_b`` channels)
    x_{l+1} = conv2_l(relu(bn2_l(h_l)))                      (3x3, ``k`` channels)

and returns ``cat(x_0, ..., x_L)``. Every ``bn1_l`` normalises a concatenation of earlier maps, so
eager PyTorch copies and normalises ``sum_l C_l`` channels (quadratic in ``L``) and keeps both copies
for backward. :func:`dense_block` instead:

- **Features in one buffer.** ``buf`` (``N, C_0 + L k, H, W``, the input's layout) is allocated
  once; ``x_0`` is copied into its first ``C_0`` channels and each ``x_{l+1}`` into its own slice.
  ATen's convolution cannot write into a channel slice (an NCHW slice is not contiguous, an NHWC
  slice is strided in C), so each ``x_{l+1}`` is written by ``conv_stats`` and copied into its slice:
  ``k`` channels per layer, ``L k`` in all (linear; eager's ``torch.cat`` copies ``sum_l C_l``).
  ``conv_stats`` reads its input slice ``buf[:, :C_l]`` in place when it is NCHW (the native CPU
  prologue takes the batch stride: each ``(n, c)`` plane of the slice is dense), forward and in
  backward's recomputed prologue; an NHWC slice (strided per pixel) and the CUDA kernels still go
  through a dense transient copy (NCHW for an NHWC slice), freed at once.
- **Statistics once per map.** The per-channel batch statistics of a concatenation are those of the
  maps in it: ``x_{l+1}``'s mean/var come from the epilogue of the conv that wrote it
  (``conv_stats``), ``x_0``'s from one ``torch.var_mean`` pass. Layer ``l``'s ``bn1`` is
  ``scale_l = gamma_l / sqrt(var[:C_l] + eps)``, ``shift_l = beta_l - mean[:C_l] scale_l``
  (``bn_finalize``) and is applied in ``conv1_l``'s prologue with the ReLU: the normalised
  concatenation is never written, in forward or for backward. ``bn2_l`` likewise in ``conv2_l``'s.
- **Saved for backward:** ``buf`` (linear in ``L``), each ``h_l`` (pre-BN, ``C_b`` channels) and the
  per-channel statistics; nothing else. Writing into ``buf`` after earlier layers read views of it
  would trip autograd's version checks, hence one :class:`torch.autograd.Function` for the block
  (as Pleiss et al. 2017), composed of the public ops and their backward ops, no new kernels.

**Backward** walks the layers in reverse with one gradient buffer ``gbuf`` (like ``buf``; the
incoming gradient accumulated in place) and per-channel accumulators ``gmean``, ``gvar`` (the
incoming gradients of the returned statistics, if any). The gradient of the loss ``f`` w.r.t. a
map ``y`` (one channel of it, ``M = N H W`` values) whose batch statistics ``mu = sum(y)/M`` and
``var = sum((y - mu)^2)/M`` are read by several consumers ``c`` (each layer's ``bn1`` over a
prefix holding that channel) is, by the chain rule over all paths,

    df/dy = G + (sum_c df_c/dmu) dmu/dy + (sum_c df_c/dvar) dvar/dy
          = G + gmean / M + 2 gvar (y - mu) / M,

with ``G`` the gradient through ``y``'s own value (the slices of the consumers' conv backward,
added into ``gbuf``), ``gmean = sum_c df_c/dmu`` and ``gvar = sum_c df_c/dvar``; ``dvar/dy =
2 (y - mu)/M - 2 sum(y - mu)/M^2 = 2 (y - mu)/M`` because ``sum(y - mu) = 0``. The consumers' terms
add, and the producer applies the sum once: each consumer's ``bn_finalize_backward`` adds its
``df_c/dmu``, ``df_c/dvar`` into ``gmean[:C_l]``, ``gvar[:C_l]``; when the walk reaches the producer
of ``x_{l+1}`` every consumer (the layers after it, and the block's output) has contributed, and
``conv_stats_backward(gbuf slice, gmean slice, gvar slice, ...)`` of ``conv2_l`` forms exactly the
line above inside its data-gradient pass. ``x_0``'s term is applied at the end, the same formula.
Checked in fp64 against the unfused torchvision model (``tests/test_dense.py``).

Per-channel tensors are fp32 (fp64 for fp64 activations), as everywhere (``_layout.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _activation, ops, reference
from ._checks import check_batch_statistics
from ._layout import channel_view, output_memory_format, stat_dtype
from ._library import NAMESPACE

_RELU = _activation.RELU  # a DenseNet layer's activation (the ops' in_act code)

_ops = getattr(torch.ops, NAMESPACE)
_DIMS = (0, 2, 3)


class Conv(NamedTuple):
    """A conv's geometry: stride, padding, dilation, groups (lists, as the op schemas take them)."""

    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int


class DenseLayerSpec(NamedTuple):
    """What :func:`dense_block` needs of one layer besides its tensors: the BN epsilons and conv geometry."""

    eps1: float
    eps2: float
    conv1: Conv
    conv2: Conv


class DenseLayerParams(NamedTuple):
    """One layer's tensors: ``bn1`` (weight, bias) over the concatenation, the 1x1 ``conv1`` weight,
    ``bn2`` (weight, bias) over the bottleneck and the ``conv2`` weight. BN weights may be None."""

    gamma1: torch.Tensor | None
    beta1: torch.Tensor | None
    weight1: torch.Tensor
    gamma2: torch.Tensor | None
    beta2: torch.Tensor | None
    weight2: torch.Tensor


class DenseBlockOutput(NamedTuple):
    """``features``: ``cat(x_0, ..., x_L)``; ``mean``/``var``: its per-channel batch statistics
    (differentiable: a following BN may use them); ``bottleneck_stats``: each layer's ``(mean, var)``
    of ``h_l`` (for ``bn2``'s running statistics; not differentiable)."""

    features: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    bottleneck_stats: list[tuple[torch.Tensor, torch.Tensor]]


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance of ``x`` in the statistics dtype (one pass)."""
    var, mean = torch.var_mean(x.to(stat_dtype(x.dtype)), dim=_DIMS, correction=0)
    return mean, var


def _stats_grad(y: torch.Tensor, mean, grad_mean, grad_var) -> torch.Tensor:
    """``grad_mean / M + 2 grad_var (y - mean) / M``: the batch statistics' gradient w.r.t. ``y``."""
    count = y.numel() // y.shape[1]
    centred = y.to(mean.dtype) - channel_view(mean)
    return channel_view(grad_mean / count) + channel_view(2.0 * grad_var / count) * centred


class _DenseBlockFunction(torch.autograd.Function):
    """The block's forward and backward (module docstring); ``flat`` is the layers' tensors in
    :class:`DenseLayerParams` order, six per layer."""

    @staticmethod
    def forward(ctx, specs: tuple[DenseLayerSpec, ...], x0: torch.Tensor, *flat):
        layers = [DenseLayerParams(*flat[6 * i:6 * i + 6]) for i in range(len(specs))]
        n, c0, h, w = x0.shape
        growth = [p.weight2.shape[0] for p in layers]
        buf = torch.empty((n, c0 + sum(growth), h, w), dtype=x0.dtype, device=x0.device,
                          memory_format=output_memory_format(x0))
        buf[:, :c0].copy_(x0)
        means, variances = map(list, zip(batch_stats(x0)))
        bottlenecks, bottleneck_stats = [], []
        channels = c0
        for spec, p in zip(specs, layers):
            scale1, shift1 = _ops.bn_finalize(torch.cat(means), torch.cat(variances), p.gamma1, p.beta1, spec.eps1)
            hidden, mean_h, var_h = _ops.conv_stats(buf[:, :channels], scale1, shift1, _RELU, p.weight1, *spec.conv1)
            scale2, shift2 = _ops.bn_finalize(mean_h, var_h, p.gamma2, p.beta2, spec.eps2)
            new, mean_new, var_new = _ops.conv_stats(hidden, scale2, shift2, _RELU, p.weight2, *spec.conv2)
            buf[:, channels:channels + new.shape[1]].copy_(new)
            channels += new.shape[1]
            means.append(mean_new)
            variances.append(var_new)
            bottlenecks.append(hidden)
            bottleneck_stats.append((mean_h, var_h))
        mean, var = torch.cat(means), torch.cat(variances)
        flat_stats = [t for pair in bottleneck_stats for t in pair]
        ctx.specs = specs
        ctx.c0 = c0
        ctx.save_for_backward(buf, mean, var, *bottlenecks, *flat_stats, *flat)
        ctx.mark_non_differentiable(*flat_stats)
        return (buf, mean, var, *flat_stats)

    @staticmethod
    def backward(ctx, grad_buf, grad_mean, grad_var, *_):
        specs, c0 = ctx.specs, ctx.c0
        count = len(specs)
        buf, mean, var, *rest = ctx.saved_tensors
        bottlenecks, flat_stats, flat = rest[:count], rest[count:3 * count], rest[3 * count:]
        layers = [DenseLayerParams(*flat[6 * i:6 * i + 6]) for i in range(count)]
        needs = ctx.needs_input_grad[2:]
        gbuf = torch.empty_like(buf)  # the one gradient buffer, accumulated in place
        if grad_buf is None:
            gbuf.zero_()
        else:
            gbuf.copy_(grad_buf)
        gmean = torch.zeros_like(mean) if grad_mean is None else grad_mean.clone()
        gvar = torch.zeros_like(var) if grad_var is None else grad_var.clone()
        grads: list[torch.Tensor | None] = [None] * len(flat)
        end = buf.shape[1]
        for i in reversed(range(count)):
            spec, p, hidden = specs[i], layers[i], bottlenecks[i]
            mean_h, var_h = flat_stats[2 * i], flat_stats[2 * i + 1]
            start = end - p.weight2.shape[0]
            new = slice(start, end)
            need = needs[6 * i:6 * i + 6]
            # conv2_l produced x_{l+1}: every consumer has added its terms by now (module docstring).
            scale2, shift2 = _ops.bn_finalize(mean_h, var_h, p.gamma2, p.beta2, spec.eps2)
            g_hidden, g_scale2, g_shift2, g_w2 = _ops.conv_stats_backward(
                gbuf[:, new], gmean[new], gvar[new], hidden, scale2, shift2, _RELU, p.weight2, buf[:, new], mean[new],
                *spec.conv2, [True, True, need[5]])
            g_mean_h, g_var_h, g_gamma2, g_beta2 = _ops.bn_finalize_backward(
                g_scale2, g_shift2, mean_h, var_h, p.gamma2, spec.eps2, [True, True, need[3], need[4]])
            scale1, shift1 = _ops.bn_finalize(mean[:start], var[:start], p.gamma1, p.beta1, spec.eps1)
            g_x, g_scale1, g_shift1, g_w1 = _ops.conv_stats_backward(
                g_hidden, g_mean_h, g_var_h, buf[:, :start], scale1, shift1, _RELU, p.weight1, hidden, mean_h,
                *spec.conv1, [True, True, need[2]])
            gbuf[:, :start].add_(g_x)
            g_mean1, g_var1, g_gamma1, g_beta1 = _ops.bn_finalize_backward(
                g_scale1, g_shift1, mean[:start], var[:start], p.gamma1, spec.eps1, [True, True, need[0], need[1]])
            gmean[:start].add_(g_mean1)
            gvar[:start].add_(g_var1)
            grads[6 * i:6 * i + 6] = [g_gamma1, g_beta1, g_w1, g_gamma2, g_beta2, g_w2]
            end = start
        grad_x0 = None
        if ctx.needs_input_grad[1]:
            x0 = buf[:, :c0]
            g = gbuf[:, :c0].to(mean.dtype) + _stats_grad(x0, mean[:c0], gmean[:c0], gvar[:c0])
            grad_x0 = g.to(x0.dtype).contiguous(memory_format=output_memory_format(buf))
        grads = [g if (g is not None and g.numel()) else None for g in grads]
        return (None, grad_x0, *grads)


def dense_block(x0: torch.Tensor, specs: tuple[DenseLayerSpec, ...],
                layers: list[DenseLayerParams]) -> DenseBlockOutput:
    """``cat(x_0, ..., x_L)`` of a dense block in training (batch statistics in every BN) and its
    per-channel batch statistics; see the module docstring. Under autocast the input and conv
    weights are cast as ``conv2d`` would cast them. The running statistics are the caller's to
    update (:func:`update_layer_running_stats` has what they need)."""
    check_batch_statistics(x0.shape, True)
    flat = []
    for p in layers:
        _, w1, w2 = ops._autocast(x0, p.weight1, p.weight2)
        flat += [p.gamma1, p.beta1, w1, p.gamma2, p.beta2, w2]
    x0 = ops._autocast(x0)[0]
    out = _DenseBlockFunction.apply(tuple(specs), x0, *flat)
    features, mean, var, stats = out[0], out[1], out[2], out[3:]
    return DenseBlockOutput(features, mean, var, [(stats[2 * i], stats[2 * i + 1]) for i in range(len(layers))])


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count: int,
                         momentum: float | None) -> None:
    """A BN's running statistics from batch statistics, in place, exactly as ``nn.BatchNorm2d`` in
    training (``momentum=None``: cumulative average; no ``num_batches_tracked``: a scratch counter)."""
    if num_batches_tracked is None:
        num_batches_tracked = torch.zeros((), dtype=torch.long, device=mean.device)
    _ops.update_running_stats_(running_mean, running_var, num_batches_tracked, mean.detach(), var.detach(), count,
                               momentum)


def running_scale_shift(mean, var, gamma, beta, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A BN's per-channel ``(scale, shift)`` from given statistics in plain ATen ops (what eval and
    exporters see), the reference's ``bn_finalize`` formulas."""
    return reference.bn_finalize(mean, var, gamma, beta, eps)


def bn_relu_conv(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, gamma, beta, eps: float,
                 weight: torch.Tensor, conv: Conv) -> torch.Tensor:
    """``conv(relu(bn(x)))`` with ``bn`` from the given per-channel statistics (batch or running) and
    applied in the conv's prologue: the normalised input is never written (a DenseNet transition)."""
    x, weight = ops._autocast(x, weight)
    scale, shift = _ops.bn_finalize(mean, var, gamma, beta, eps)
    return _ops.conv_stats(x, scale, shift, _RELU, weight, *conv)[0]


def relu_conv_prologue(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                       conv: Conv) -> torch.Tensor:
    """``conv(relu(x * scale + shift), weight)`` (``scale``/``shift``: per-channel fp32, a BN's from its
    running statistics) with the affine map and ReLU applied in the conv's prologue, reading a
    channel prefix of a feature buffer in place (a DenseNet layer in eval: the normalised input is
    written once as the conv's operand, not in three passes); the ``conv_stats`` op, its statistics unused."""
    x, weight = ops._autocast(x, weight)
    return _ops.conv_stats(x, scale, shift, _RELU, weight, *conv)[0]

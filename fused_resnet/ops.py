"""Functional API of the fused ops, with ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.ReLU`` (``ReLU6``,
``SiLU``, ``Hardswish``, ``LeakyReLU``) semantics. Activations are named by ``activation="relu" |
"relu6" | "silu" | "hardswish" | "leaky_relu" | "leaky_relu_0.1" | None`` (``"leaky_relu"``: slope
0.01, as ``nn.LeakyReLU()``; ``"leaky_relu_0.1"``: slope 0.1; no other slope); the older boolean
``relu=`` / ``in_relu=`` arguments still work (True: ReLU, False: none).

Each function calls the registered ops (``torch.ops.fused_resnet.*``) and little around them (the
eval weight folding), so autograd, ``torch.compile`` and autocast see through every step. A
training conv+BN is one op, ``conv_bn`` (conv, statistics, running-statistics update, BN finalize);
with synchronised BN, three, so that the statistics' all-gather sits between them. Activations may be NCHW or channels_last, in fp16, bf16,
fp32 or fp64; BN parameters may be of any float dtype (they are used in fp32, fp64 for fp64).

The central object is a *deferred* BN: ``conv_bn`` returns the raw conv output ``y`` with the
BN's per-channel ``scale``/``shift`` instead of the normalised activation, so that the next op
applies ``act(y * scale + shift)`` while it reads ``y`` (the next conv's prologue, or the block
tail). The normalised activation is then neither written in forward nor saved for backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _activation, _sync_stats, reference
from ._layout import channel_view, stat_dtype
from ._library import NAMESPACE

_ops = getattr(torch.ops, NAMESPACE)
IntPair = int | Sequence[int]


class DeferredBN(NamedTuple):
    """A conv output ``y`` whose BN is not applied yet: the activation is ``y * scale + shift``."""

    y: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


def _pair(v: IntPair) -> Sequence[int]:
    # A module's stride/padding tuple goes to the op as it is: rebuilding lists per call is host time.
    return (v, v) if isinstance(v, int) else v


def _conv_args(stride, padding, dilation, groups):
    return _pair(stride), _pair(padding), _pair(dilation), int(groups)


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast conv operands to the autocast dtype when autocast is on (as it does for ``conv2d``)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def _promote(a: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bring a residual and the main branch to one dtype, as eager ``a + b`` would."""
    if b is None or a.dtype == b.dtype:
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def uses_batch_stats(training: bool, running_mean, running_var) -> bool:
    """Whether a BN normalises with batch statistics."""
    # nn.BatchNorm2d: batch statistics in training, and in eval when no running stats are kept.
    return training or (running_mean is None and running_var is None)


def conv_bn(
    x: torch.Tensor | DeferredBN,
    weight: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None = None,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    in_relu: bool | None = None,
    process_group=None,
    in_activation: str | None = "relu",
    bias: torch.Tensor | None = None,
) -> DeferredBN:
    """``conv2d`` then ``batch_norm`` with the BN left deferred (see :class:`DeferredBN`).

    ``x`` is an activation, or a :class:`DeferredBN` whose ``act(y * scale + shift)`` the conv
    applies while loading its input (``in_activation``: ``"relu"``, ``"relu6"``, ``"silu"``,
    ``"hardswish"``, ``"leaky_relu"``, ``"leaky_relu_0.1"`` or None; ``in_relu``, when given, overrides
    it: True ReLU, False none). In training the batch statistics are computed in the conv's epilogue
    and the running statistics updated in place exactly as ``nn.BatchNorm2d`` does (``momentum=None``:
    cumulative average); in eval the running statistics are used. With a ``process_group`` (``torch.distributed``), training statistics are
    those of the whole batch across its ranks, as ``nn.SyncBatchNorm`` computes them (see
    :mod:`fused_resnet._sync_stats`: one all-gather of ``2C + 1`` values forward, one all-reduce
    of ``2C`` backward).

    ``bias``: the conv's own bias ``b`` (``nn.Conv2d(bias=True)``), which the BN absorbs exactly: with
    batch statistics ``bn(conv(x) + b) == bn(conv(x))`` (the batch mean takes ``b`` away) and the
    running mean is updated with the batch mean of ``conv(x) + b``; with running statistics the BN
    normalises ``conv(x)`` with ``running_mean - b``. The schemas are unchanged.
    """
    in_scale = in_shift = None
    if isinstance(x, DeferredBN):
        x, in_scale, in_shift = x
        in_act = _activation.from_flag(in_activation, in_relu)
    else:
        in_act = _activation.NONE  # a plain activation is fed to the conv as it is
    x, weight = _autocast(x, weight)
    conv = _conv_args(stride, padding, dilation, groups)
    sdt = stat_dtype(x.dtype)
    if not uses_batch_stats(training, running_mean, running_var):
        y, _, _ = _ops.conv_stats(x, in_scale, in_shift, in_act, weight, *conv)
        return DeferredBN(y, *_ops.bn_finalize(_absorb(running_mean.to(sdt), bias), running_var.to(sdt), bn_weight,
                                               bn_bias, eps))
    update = training and running_mean is not None and running_var is not None
    if update and num_batches_tracked is None:
        if momentum is None:
            raise ValueError("fused_resnet: momentum=None (cumulative average) needs num_batches_tracked")
        num_batches_tracked = torch.zeros((), dtype=torch.long, device=x.device)
    synced = training and process_group is not None
    # The op updates the running statistics itself unless the conv has a bias: then from the batch
    # statistics it returns, below (its mean is that of conv(x), without b).
    in_op = update and bias is None and not synced
    if not synced:
        # One op forward and one backward: conv, statistics, running-statistics update, finalize.
        y, scale, shift, mean, var = _ops.conv_bn(x, in_scale, in_shift, in_act, weight, bn_weight, bn_bias,
                                                  *((running_mean, running_var, num_batches_tracked) if in_op
                                                    else (None, None, None)), momentum, eps, *conv)
        count = y.shape[0] * y.shape[2] * y.shape[3]
    else:
        # Synchronised BN: local statistics, their merge across ranks (an all-gather), then the finalize.
        y, mean, var = _ops.conv_stats(x, in_scale, in_shift, in_act, weight, *conv)
        count = y.shape[0] * y.shape[2] * y.shape[3]
        mean, var, count = _sync_stats.merge_batch_stats(mean, var, count, process_group)  # count: 0-d tensor
        scale, shift = _ops.bn_finalize(mean, var, bn_weight, bn_bias, eps)
    if update and not in_op:
        # The batch mean of conv(x) + b is the op's mean + b; the variance does not move.
        update_ = _sync_stats.update_running_stats_ if synced else _ops.update_running_stats_
        mean = mean.detach() if bias is None else mean.detach() + bias.detach().to(mean.dtype)
        update_(running_mean, running_var, num_batches_tracked, mean, var.detach(), count, momentum)
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        # With batch statistics the BN's output does not depend on b (its exact gradient is zero); "+ b * 0"
        # on the per-channel shift gives it as a zero tensor, as unfused, not None (an optimizer skips a
        # parameter without a gradient: no weight decay, no momentum). A NaN / inf b still poisons the output.
        shift = shift + (bias * 0).to(shift.dtype)
    return DeferredBN(y, scale, shift)


def _absorb(running_mean: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The running mean a BN after a conv with bias ``bias`` normalises the bias-free ``conv(x)`` with:
    ``running_mean - bias`` (differentiable in ``bias``), in ``running_mean``'s dtype."""
    return running_mean if bias is None else running_mean - bias.to(running_mean.dtype)


def bn_add_relu(
    y: torch.Tensor | DeferredBN,
    residual: torch.Tensor | DeferredBN | None = None,
    *,
    relu: bool | None = None,
    activation: str | None = "relu",
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(gate * bn(y) + bn_r(residual))`` in one pass, each side a plain tensor or a
    :class:`DeferredBN` (the downsample branch's BN is then applied in the same pass);
    ``activation``: ``"relu"``, ``"relu6"``, ``"silu"``, ``"hardswish"``, ``"leaky_relu"``,
    ``"leaky_relu_0.1"`` or None (``relu``, when given, overrides it).
    ``gate`` (optional) multiplies the main branch per sample and channel: shape (N, C) or
    (N, C, 1, 1), as timm's SE gate or DropPath's per-sample keep-scale; a gate in neither the
    activation's dtype nor its statistics dtype is cast to the latter. NCHW or channels_last."""
    y, scale, shift = y if isinstance(y, DeferredBN) else (y, None, None)
    res_scale = res_shift = None
    if isinstance(residual, DeferredBN):
        residual, res_scale, res_shift = residual
    y, residual = _promote(y, residual)
    if gate is not None and gate.dtype not in (y.dtype, stat_dtype(y.dtype)):
        gate = gate.to(stat_dtype(y.dtype))
    return _ops.bn_add_relu(y, scale, shift, residual, res_scale, res_shift,
                            _activation.from_flag(activation, relu), gate)


def add_relu(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``relu(x + residual)`` in one pass (one read of each, one write)."""
    return bn_add_relu(x, residual, activation="relu")


def fold_bn(weight, bn_weight, bn_bias, running_mean, running_var, eps: float, conv_bias=None):
    """Conv weight and bias with an eval-mode BN folded in: ``bn(conv(x, w) + conv_bias) == conv(x, w') + b'``
    (``conv_bias``: the conv's own bias, or None; folded as ``b' = (conv_bias - running_mean) * scale +
    bn_bias``). The folding runs in fp32 (fp64 for fp64 weights); ``w'`` keeps ``weight``'s dtype."""
    # The reference's formulas as plain ATen ops, not the op bn_finalize: this is what exporters see.
    sdt = stat_dtype(weight.dtype)
    scale, shift = reference.bn_finalize(_absorb(running_mean.to(sdt), conv_bias), running_var.to(sdt), bn_weight,
                                         bn_bias, eps)
    return (weight.to(scale.dtype) * scale.view(-1, 1, 1, 1)).to(weight.dtype), shift


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    relu: bool | None = None,
    activation: str | None = "relu",
) -> torch.Tensor:
    """``act(conv2d(x, weight) + bias + residual)`` with the bias, residual and activation applied
    in the conv's epilogue (the inference form of a block, BN folded by :func:`fold_bn`);
    ``activation`` as in :func:`bn_add_relu`."""
    act = _activation.from_flag(activation, relu)
    x, weight = _autocast(x, weight)
    if bias is not None:
        bias = bias.to(stat_dtype(x.dtype))
    if residual is not None and residual.dtype != x.dtype:
        if torch.promote_types(x.dtype, residual.dtype) != x.dtype:
            out = conv_bias_act(x, weight, bias, None, stride=stride, padding=padding, dilation=dilation,
                                groups=groups, activation=None)
            return bn_add_relu(out, residual, activation=act)
        residual = residual.to(x.dtype)
    return _ops.conv_bias_act(x, weight, bias, residual, *_conv_args(stride, padding, dilation, groups), act)


def conv_bn_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None = None,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    relu: bool | None = None,
    process_group=None,
    activation: str | None = "relu",
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(batch_norm(conv2d(x, weight, bias)))`` with ``nn.Conv2d`` +
    ``nn.BatchNorm2d`` + ``nn.ReLU`` (``ReLU6``, ``SiLU``, ``Hardswish``, ``LeakyReLU``: ``activation`` as in
    :func:`bn_add_relu`)
    semantics, running statistics updated in place in training. In eval (running statistics) the BN
    is folded into the conv: one conv with a bias+activation epilogue. ``process_group``:
    synchronised statistics, as in :func:`conv_bn`; ``bias``: the conv's own bias, absorbed by the BN
    (:func:`conv_bn`)."""
    act = _activation.from_flag(activation, relu)
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if not uses_batch_stats(training, running_mean, running_var):
        folded_weight, folded_bias = fold_bn(weight, bn_weight, bn_bias, running_mean, running_var, eps, bias)
        return conv_bias_act(x, folded_weight, folded_bias, activation=act, **conv)
    deferred = conv_bn(x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                       training=training, momentum=momentum, eps=eps, process_group=process_group, bias=bias, **conv)
    return bn_add_relu(deferred, activation=act)


def batch_norm_deferred(
    x: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None = None,
    *,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    process_group=None,
) -> DeferredBN:
    """``batch_norm(x)`` of an activation ``x`` (NCHW or channels_last), left deferred: ``x`` itself
    with the BN's per-channel ``scale``/``shift``, for a pre-activation block whose convs apply
    ``act(x * scale + shift)`` in their prologue (:func:`conv_bn`, :func:`conv`), so that the
    normalised activation is never written. In training the batch mean and biased variance are one
    ``var_mean`` read of ``x`` (in fp32, fp64 for fp64) and the running statistics are updated in
    place exactly as ``nn.BatchNorm2d`` does (``process_group``: whole-batch statistics, as in
    :func:`conv_bn`); in eval the running statistics are used. Differentiable."""
    sdt = stat_dtype(x.dtype)
    if not uses_batch_stats(training, running_mean, running_var):
        return DeferredBN(x, *_ops.bn_finalize(running_mean.to(sdt), running_var.to(sdt), bn_weight, bn_bias, eps))
    var, mean = torch.var_mean(x.to(sdt), dim=(0, 2, 3), correction=0)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    synced = training and process_group is not None
    if synced:
        mean, var, count = _sync_stats.merge_batch_stats(mean, var, count, process_group)  # count: 0-d tensor
    if training and running_mean is not None and running_var is not None:
        if num_batches_tracked is None:
            if momentum is None:
                raise ValueError("fused_resnet: momentum=None (cumulative average) needs num_batches_tracked")
            num_batches_tracked = torch.zeros((), dtype=torch.long, device=x.device)
        update = _sync_stats.update_running_stats_ if synced else _ops.update_running_stats_
        update(running_mean, running_var, num_batches_tracked, mean.detach(), var.detach(), count, momentum)
    return DeferredBN(x, *_ops.bn_finalize(mean, var, bn_weight, bn_bias, eps))


def conv(
    x: torch.Tensor | DeferredBN,
    weight: torch.Tensor,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    in_activation: str | int | None = "relu",
) -> torch.Tensor:
    """``conv2d(act(y * scale + shift), weight)`` of a deferred BN ``x`` (``in_activation`` as in
    :func:`conv_bn`): a conv with no BN after it (a pre-activation block's last conv or projection)
    that applies the previous BN in its prologue. It is the ``conv_stats`` op with its statistics
    unused (an extra per-channel reduction of the output, no extra write); a plain ``x``: ``conv2d``."""
    if not isinstance(x, DeferredBN):
        return torch.nn.functional.conv2d(x, weight, None, _pair(stride), _pair(padding), _pair(dilation), groups)
    y, in_scale, in_shift = x
    y, weight = _autocast(y, weight)
    out, _, _ = _ops.conv_stats(y, in_scale, in_shift, _activation.from_flag(in_activation, None), weight,
                                *_conv_args(stride, padding, dilation, groups))
    return out

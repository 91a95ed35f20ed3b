"""Pre-activation residual blocks (timm's ResNetV2 ``PreActBottleneck`` / ``PreActBasic``), fused.

Such a block computes ``conv_k(act(bn_k(...conv_1(act(bn_1(x)))))) + shortcut`` with ``shortcut =
downsample(act(bn_1(x)))`` or ``x``: every BN comes *before* a conv (timm's ``BatchNormAct2d``, BN then
its own activation). Fused (:class:`FusedPreActBlock`, mixed into the block's own class by ``fuse``):

- training (any of its BNs on batch statistics): ``bn_1``'s batch statistics are one ``var_mean`` read
  of ``x`` (``ops.batch_norm_deferred``; running statistics updated as ``nn.BatchNorm2d`` does) and the
  BN stays deferred: ``conv_1`` applies ``act(x * scale + shift)`` in its prologue. Each link
  ``conv_i -> bn_{i+1} -> act -> conv_{i+1}`` is ``ops.conv_bn`` (statistics in the conv's epilogue)
  feeding the next conv's prologue, as the post-activation blocks' links are. A conv with no BN after
  it (the last one, timm's ``DownsampleConv`` projection) applies its BN in its prologue too
  (``ops.conv``: the ``conv_stats`` op with its statistics unused), unless its output is wider than its
  input: then, under autograd, that BN's output is written once and a plain conv runs (fewer bytes kept
  for backward than the wide output ``conv_stats`` keeps). Any other downsample module
  (``DownsampleAvg``'s pooling first) gets the pre-activation written by one ``bn_add_relu`` pass and
  runs as it is. The add is ``y + shortcut``, after the block's own DropPath when that drops.
- eval (running statistics everywhere): the pre-activation is written once (one ``bn_add_relu``
  pass), ``bn_{i+1}`` is folded into ``conv_i`` with its activation in the conv's epilogue
  (``conv_bias_act``, or the prepared convs of ``prepare_for_inference``), and the last conv adds the
  shortcut in its epilogue. Under ``torch.compile`` / export in eval the block's own forward runs
  (plain ATen ops, for the compiler to fuse).

Every call checks the block's structure again (modules replaced, hooks added): if it changed, the
block's own forward runs.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _activation, _foreign, _patterns, distributed, inference, ops
from .modules import _conv_kwargs, _FusedBlockMixin, _momentum, _uses_batch_stats, conv_bn, eval_conv, \
    warn_if_global_hooks


def norm_deferred(x: torch.Tensor, bn: nn.Module) -> ops.DeferredBN:
    """``ops.batch_norm_deferred`` with the parameters and settings of the BN module ``bn``."""
    return ops.batch_norm_deferred(
        x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, training=bn.training,
        momentum=_momentum(bn), eps=bn.eps, process_group=distributed.sync_group(bn, x))


def _conv(h, conv: nn.Conv2d, act: int) -> torch.Tensor:
    return ops.conv(h, conv.weight, in_activation=act, **_conv_kwargs(conv))


def _widens(conv: nn.Conv2d) -> bool:
    """Whether ``conv``'s output is larger than its input (more channels than its stride removes pixels)."""
    return conv.out_channels > conv.in_channels * conv.stride[0] * conv.stride[1]


def conv_without_bn(h, conv: nn.Conv2d, act: int) -> torch.Tensor:
    """A conv with no BN after it, of the deferred BN ``h``. ``ops.conv`` (the prologue) keeps the conv's
    output for its backward; when that output is larger than the input (a bottleneck's conv3, a
    widening projection) and autograd records, the BN's output is written instead (one ``bn_add_relu``
    pass) and a plain conv keeps that: fewer bytes saved for backward. A plain ``h``: the conv."""
    if isinstance(h, ops.DeferredBN) and torch.is_grad_enabled() and _widens(conv):
        h = ops.bn_add_relu(h, activation=act)
    return _conv(h, conv, act)


@_foreign.register_mixin
class FusedPreActBlock(_FusedBlockMixin):
    """Mixed into a timm pre-activation block (``_patterns.preact_block``): see the module docstring."""

    fused_names: tuple[tuple[str, str], ...]  # (norm, conv) attribute names, in order

    def _parts(self):
        m = self._modules
        norms = [m[n] for n, _ in self.fused_names]
        convs = [m[c] for _, c in self.fused_names]
        return norms, convs

    def _chain(self):
        # The conv -> BN links (each norm after the first follows a conv); norm1 is the block's prologue.
        norms, convs = self._parts()
        return list(zip(convs[:-1], norms[1:]))

    def prologue_norms(self) -> list[nn.Module]:
        """The BNs applied before the block's first conv (``fusion_report``)."""
        return [self._modules[self.fused_names[0][0]]]

    def _fused_pairs(self):
        if not _patterns.preact_block_intact(self):
            return None
        return self._chain(), None

    def eval_pairs(self):
        return self._chain() if self.fusable() else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _patterns.preact_block_intact(self):
            return super(_FusedBlockMixin, self).forward(x)
        norms, convs = self._parts()
        batch_stats = False
        for bn in norms:
            batch_stats = batch_stats or _uses_batch_stats(bn)
        if not batch_stats and inference.emits_aten():
            return super(_FusedBlockMixin, self).forward(x)
        warn_if_global_hooks()
        acts = [_activation.module_code(bn.act) for bn in norms]
        downsample = self._modules.get("downsample")
        drop = self._modules.get("drop_path")
        if batch_stats:
            y, shortcut = self._train_forward(x, norms, convs, acts, downsample)
        else:
            y, shortcut = self._eval_forward(x, norms, convs, acts, downsample)
            if y is None:  # the shortcut was added in the last conv's epilogue
                return shortcut
        if not _foreign.inactive(drop):
            y = drop(y)  # the block's own DropPath: its random draws as unfused
        return y + shortcut

    def _train_forward(self, x, norms, convs, acts, downsample):
        h: torch.Tensor | ops.DeferredBN = norm_deferred(x, norms[0])
        shortcut = x
        if downsample is not None:  # before conv1, as unfused (the order of a synchronised BN's collectives)
            ds_conv = _patterns.preact_downsample_conv(downsample)
            if ds_conv is not None:
                shortcut = conv_without_bn(h, ds_conv, acts[0])
            else:
                h = ops.bn_add_relu(h, activation=acts[0])  # the pre-activation, written for the module
                shortcut = downsample(h)
        for conv, bn, act in zip(convs[:-1], norms[1:], acts[:-1]):
            h = conv_bn(h, conv, bn, act)
        return conv_without_bn(h, convs[-1], acts[-1]), shortcut

    def _eval_forward(self, x, norms, convs, acts, downsample):
        prepared = None
        if "_prepared" in self.__dict__:
            prepared = self.prepared_convs(self._chain())
        prepared = iter(prepared or ())
        h = ops.bn_add_relu(norm_deferred(x, norms[0]), activation=acts[0])  # the pre-activation, written once
        shortcut = x if downsample is None else downsample(h)
        for conv, bn, act in zip(convs[:-1], norms[1:], acts[1:]):
            h = eval_conv(h, conv, bn, None, act, next(prepared, None))
        last, drop = convs[-1], self._modules.get("drop_path")
        if _foreign.inactive(drop):
            return None, ops.conv_bias_act(h, last.weight, None, shortcut, activation=None, **_conv_kwargs(last))
        return _conv(h, last, _activation.NONE), shortcut

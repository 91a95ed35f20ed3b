"""Fused DenseNet blocks and transitions, swapped in by ``fuse`` (torchvision's and timm's classes).

``fuse`` changes the class of each recognised dense block and transition (``_dense_patterns``) in
place to a fused subclass of its own class (``_foreign.subclass``), so module names, parameters,
buffers, ``state_dict`` keys, ``isinstance`` and methods stay; the layers themselves are not
changed (the block runs them). The paths, chosen on every call:

- **Dense block, batch statistics** (training, or BNs without running statistics): the whole block
  is :func:`dense_ops.dense_block` (one feature buffer, statistics once per map, every BN + ReLU in
  the next conv's prologue, one autograd function with linear saved memory); the running statistics
  of every ``norm1`` / ``norm2`` are then updated exactly as ``nn.BatchNorm2d`` would, from the same
  batch values (``norm1`` of layer ``l`` from the first ``C_l`` channels' statistics).
- **Dense block, running statistics** (eval) without autograd, on one feature buffer
  (:func:`_eval_block`): ``norm1`` + ReLU applied to the buffer's prefix (in NCHW in ``conv1``'s
  prologue; in channels_last, and as everything under ``torch.compile`` / export, by ATen ops into a
  transient), ``norm2`` folded into ``conv1`` (``ops.fold_bn``), ``conv2``'s output copied into its
  slice. With autograd in eval, the block's own forward. After ``prepare_for_inference`` the folds
  are made once: each ``conv1`` + ``norm2`` an ``inference.PreparedConv`` (in channels_last run by
  it: the native backend's routes), each ``norm1``'s scale and shift a :class:`PreparedNorm`, both
  guarded as every prepared conv is.
- **Transition, batch statistics**: one statistics pass over the block's output, the BN + ReLU in
  the 1x1 conv's prologue (:func:`dense_ops.bn_relu_conv`; the normalised input is never written),
  then its own pool. With running statistics and without autograd, :func:`_eval_transition` (the
  BN + ReLU in the conv's prologue in NCHW, one ATen pass in channels_last), then its own pool; with
  autograd in eval, its own forward.
- **Own forward** (exactly the unfused module, ``memory_efficient`` / ``grad_checkpointing`` as
  set) whenever a module was replaced or given a hook since ``fuse``, BNs disagree on their mode,
  or a layer's ``drop_rate > 0`` in training (dropout draws random numbers the fused path does not
  reproduce).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import _activation, _dense_patterns, _foreign, dense_ops, inference, ops
from ._dense_patterns import DenseLayerModules, TransitionModules
from ._layout import channel_view, output_memory_format, stat_dtype
from .modules import _momentum, has_hooks, is_fusable_conv, tracks_as_built


def _conv(conv: nn.Conv2d) -> dense_ops.Conv:
    return dense_ops.Conv(list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)


def _batch_stats_mode(norms) -> bool | None:
    """True when every BN normalises with batch statistics, False when every one uses its running
    statistics, None when they disagree or one's ``track_running_stats`` was changed since it was built."""
    if not all(tracks_as_built(bn) for bn in norms):
        return None
    modes = {ops.uses_batch_stats(bn.training, bn.running_mean, bn.running_var) for bn in norms}
    return modes.pop() if len(modes) == 1 else None


def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """``bn``'s running statistics from the batch's, as ``nn.BatchNorm2d`` updates them in training."""
    if bn.training and bn.running_mean is not None and bn.running_var is not None:
        dense_ops.update_running_stats(bn.running_mean, bn.running_var, bn.num_batches_tracked, mean, var, count,
                                       _momentum(bn))


def _intact(module: nn.Module, children: tuple[nn.Module, ...]) -> bool:
    """``module`` still holds the children ``fuse`` found, neither it nor they have hooks, and its convs
    are still ones the fused paths compute (a ``padding_mode`` set since ``fuse`` is applied only by the
    conv's own forward)."""
    now = tuple(module._modules.values())
    return len(now) == len(children) and all(a is b for a, b in zip(now, children)) and not any(
        has_hooks(m) for m in (module, *children, *(g for c in children for g in c.children()))) and all(
        is_fusable_conv(c) for c in children if isinstance(c, nn.Conv2d))


class PreparedNorm:
    """An eval-mode BN's per-channel ``(scale, shift)`` (``norm1`` of a dense layer), computed once by
    ``prepare_for_inference``, with the guard of ``inference.PreparedConv``: the same tensors, unchanged."""

    def __init__(self, bn: nn.Module):
        params, buffers = bn._parameters, bn._buffers
        self.stores = (params, params, buffers, buffers)
        self.names = ("weight", "bias", "running_mean", "running_var")
        self.sources = tuple(store.get(name) for store, name in zip(self.stores, self.names))
        self.versions = tuple(None if t is None else t._version for t in self.sources)
        self.eps = bn.eps
        mean, var = bn.running_mean, bn.running_var
        with torch.inference_mode(False), torch.no_grad():  # usable later with autograd on
            sdt = stat_dtype(mean.dtype)
            self.scale, self.shift = dense_ops.running_scale_shift(mean.to(sdt), var.to(sdt), bn.weight, bn.bias,
                                                                   bn.eps)

    def current(self, bn: nn.Module) -> bool:
        """Whether ``bn`` still holds the tensors the scale and shift were made from, unchanged in place."""
        if bn.eps != self.eps or bn._parameters is not self.stores[0] or bn._buffers is not self.stores[2]:
            return False
        for store, name, then, version in zip(self.stores, self.names, self.sources, self.versions):
            now = store.get(name)
            if now is not then or (now is not None and now._version != version):
                return False
        return True


def _affine_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``relu(x * scale + shift)`` (per-channel fp32/fp64 ``scale``, ``shift``) into a new tensor in
    ``x``'s dtype and layout, ``x`` possibly a channel prefix of a feature buffer. One ``addcmul`` pass and
    a ReLU in place: ATen's mul + add + relu took three, and its mul was slow on a channels_last prefix
    (strided per pixel): 224 of 256 channels at 56x56, one thread, 0.3 ms against 2.1 ms."""
    sdt = scale.dtype
    return torch.addcmul(channel_view(shift), x.to(sdt), channel_view(scale)).relu_().to(x.dtype)


def _eval_block(x: torch.Tensor, layers: list[DenseLayerModules],
                prepared: list[tuple[PreparedNorm, inference.PreparedConv]] | None = None) -> torch.Tensor:
    """The block with running statistics on one feature buffer (no autograd): in NCHW each layer's BN +
    ReLU applied to the buffer's channel prefix in the 1x1 conv's prologue (one pass, the ``conv_stats``
    op; its statistics unused), ``norm2`` folded into that conv; in plain ATen ops in channels_last (the
    prologue in one ``addcmul`` pass and a ReLU in place) and under ``torch.compile`` / export (which
    fuse them themselves). ``prepared``: each layer's ``norm1`` and ``conv1`` + ``norm2`` folded once
    (``FusedDenseBlock.prepare_for_inference``), else folded here."""
    sdt = stat_dtype(x.dtype)
    c0 = x.shape[1]
    total = c0 + sum(m.conv2.out_channels for m in layers)
    buf = torch.empty((x.shape[0], total, *x.shape[2:]), dtype=x.dtype, device=x.device,
                      memory_format=output_memory_format(x))
    buf[:, :c0].copy_(x)
    channels = c0
    # The prologue reads an NCHW buffer's channel prefix in place; a channels_last prefix is not dense
    # (the op would copy it first: 0.68x of eager's time on DenseNet-121 against 0.92x in ATen ops).
    in_prologue = buf.is_contiguous() and not inference.emits_aten()
    for i, m in enumerate(layers):
        conv1 = None
        if prepared is not None:
            norm1, conv1 = prepared[i]
            scale, shift, w1, b1 = norm1.scale.to(sdt), norm1.shift.to(sdt), conv1.weight, conv1.bias
        else:
            n1 = m.norm1
            scale, shift = dense_ops.running_scale_shift(n1.running_mean.to(sdt), n1.running_var.to(sdt),
                                                         n1.weight, n1.bias, n1.eps)
            n2 = m.norm2
            w1, b1 = ops.fold_bn(m.conv1.weight, n2.weight, n2.bias, n2.running_mean, n2.running_var, n2.eps)
        if in_prologue:
            h = dense_ops.relu_conv_prologue(buf[:, :channels], scale, shift, w1, _conv(m.conv1))
            h = torch.relu_(h.add_(channel_view(b1.to(h.dtype))))
        elif conv1 is not None:  # the prepared conv (in fp32 on the CPU: the native backend's routes)
            h = conv1(_affine_relu(buf[:, :channels], scale, shift), None, _activation.RELU)
        else:
            a = _affine_relu(buf[:, :channels], scale, shift)
            h = F.conv2d(a, w1, b1.to(w1.dtype), m.conv1.stride, m.conv1.padding, m.conv1.dilation).relu_()
        c2 = m.conv2
        new = F.conv2d(h, c2.weight, None, c2.stride, c2.padding, c2.dilation, c2.groups)
        buf[:, channels:channels + new.shape[1]].copy_(new)
        channels += new.shape[1]
    return buf


@_foreign.register_mixin
class FusedDenseBlock(inference.Preparable):
    """Mixed into torchvision's ``_DenseBlock`` / timm's ``DenseBlock`` (module docstring)."""

    fused_layers: tuple[DenseLayerModules, ...]

    def eval_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """Each layer's ``(conv1, norm2)``, when the block runs its eval path (intact, every BN on its
        running statistics); else none."""
        layers = self.fused_layers
        if not self._layers_intact() or _batch_stats_mode([bn for m in layers for bn in (m.norm1, m.norm2)]) \
                is not False:
            return []
        return [(m.conv1, m.norm2) for m in layers]

    def prepare_for_inference(self, autotune: bool = False) -> None:
        """Fold each layer's ``conv1`` + ``norm2`` (and prepack it) and ``norm1``'s scale and shift once."""
        self.drop_prepared()
        if self.eval_pairs():
            super().prepare_for_inference(autotune)
            self.__dict__["_prepared_norms"] = [PreparedNorm(m.norm1) for m in self.fused_layers]

    def drop_prepared(self) -> None:
        self.__dict__.pop("_prepared_norms", None)
        super().drop_prepared()

    def __getstate__(self):
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k != "_prepared_norms"} if "_prepared_norms" in state else state

    def _prepared_layers(self, layers) -> list[tuple[PreparedNorm, inference.PreparedConv]] | None:
        """The prepared folds if they may serve this call (``inference.Preparable.prepared_convs``'s rules;
        a changed ``norm1`` drops them with the same warning)."""
        norms = self.__dict__.get("_prepared_norms")
        if norms is None or "_prepared" not in self.__dict__:
            return None
        convs = self.prepared_convs([(m.conv1, m.norm2) for m in layers])
        if convs is None:
            if "_prepared" not in self.__dict__:  # dropped as stale
                self.drop_prepared()
            return None
        if len(norms) == len(layers) and all(p.current(m.norm1) for p, m in zip(norms, layers)):
            return list(zip(norms, convs))
        self.drop_prepared()
        warnings.warn(
            f"fused_resnet: a parameter or BN buffer of this {type(self).__name__} changed since "
            "prepare_for_inference(); it runs unprepared (folding on every call) until prepared again",
            stacklevel=3,
        )
        return None

    def _layers_intact(self) -> bool:
        layers = self.fused_layers
        now = tuple(self._modules.values())
        return len(now) == len(layers) and all(a is m.layer for a, m in zip(now, layers)) and all(
            _intact(m.layer, m.children) for m in layers)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        layers = self.fused_layers
        if not self._layers_intact():
            return super().forward(init_features)
        mode = _batch_stats_mode([bn for m in layers for bn in (m.norm1, m.norm2)])
        if mode and not (self.training and any(m.layer.drop_rate > 0 for m in layers)):
            return self._batch_stats_forward(init_features, layers)
        needs_grad = torch.is_grad_enabled() and (init_features.requires_grad or any(
            p.requires_grad for m in layers for p in m.layer.parameters()))
        if mode is False and not needs_grad:
            return _eval_block(init_features, layers, self._prepared_layers(layers))
        return super().forward(init_features)

    def _batch_stats_forward(self, x: torch.Tensor, layers) -> torch.Tensor:
        specs = tuple(dense_ops.DenseLayerSpec(m.norm1.eps, m.norm2.eps, _conv(m.conv1), _conv(m.conv2))
                      for m in layers)
        params = [dense_ops.DenseLayerParams(m.norm1.weight, m.norm1.bias, m.conv1.weight, m.norm2.weight,
                                             m.norm2.bias, m.conv2.weight) for m in layers]
        out = dense_ops.dense_block(x, specs, params)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        for m, (mean_h, var_h) in zip(layers, out.bottleneck_stats):
            channels = m.conv1.in_channels
            _update_running_stats(m.norm1, out.mean[:channels], out.var[:channels], count)
            _update_running_stats(m.norm2, mean_h, var_h, count)
        return out.features


def _eval_transition(x: torch.Tensor, norm: nn.Module, conv: nn.Conv2d) -> torch.Tensor:
    """A transition's ``conv(relu(norm(x)))`` with running statistics, without autograd: in NCHW the BN +
    ReLU in the conv's prologue (the ``conv_stats`` op, one pass), else (channels_last, and under
    ``torch.compile`` / export) :func:`_affine_relu` and ATen's conv (eager's BN alone took 1.2 ms on
    DenseNet-121's first transition in channels_last, 256 channels at 56x56, one thread)."""
    sdt = stat_dtype(x.dtype)
    scale, shift = dense_ops.running_scale_shift(norm.running_mean.to(sdt), norm.running_var.to(sdt), norm.weight,
                                                 norm.bias, norm.eps)
    if x.is_contiguous() and not inference.emits_aten():
        return dense_ops.relu_conv_prologue(x, scale, shift, conv.weight, _conv(conv))
    return F.conv2d(_affine_relu(x, scale, shift), conv.weight, None, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


@_foreign.register_mixin
class FusedDenseTransition:
    """Mixed into torchvision's ``_Transition`` / timm's ``DenseTransition`` (module docstring)."""

    fused_transition: TransitionModules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.fused_transition
        mode = _batch_stats_mode([t.norm]) if _intact(self, t.children) else None
        if mode is False and not (torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in self.parameters()))):
            return t.pool(_eval_transition(x, t.norm, t.conv))
        if not mode:
            return super().forward(x)
        mean, var = dense_ops.batch_stats(x)
        _update_running_stats(t.norm, mean, var, x.shape[0] * x.shape[2] * x.shape[3])
        y = dense_ops.bn_relu_conv(x, mean, var, t.norm.weight, t.norm.bias, t.norm.eps, t.conv.weight, _conv(t.conv))
        return t.pool(y)


def restore(module: nn.Module) -> None:
    """Give a fused dense module back the class it had before ``fuse`` (else leave it alone)."""
    if isinstance(module, (FusedDenseBlock, FusedDenseTransition)):
        module.__class__ = module.__dict__.pop("class_before_fuse")
        module.__dict__.pop("fused_layers", None)
        module.__dict__.pop("fused_transition", None)
        module.__dict__.pop("_prepared", None)
        module.__dict__.pop("_prepared_norms", None)


def _swap(module: nn.Module, mixin: type, **state) -> None:
    module.__dict__["class_before_fuse"] = type(module)
    module.__class__ = _foreign.subclass(mixin, type(module))
    module.__dict__.update(state)


def fuse_dense(model: nn.Module) -> list[str]:
    """Swap, in place, every recognised dense block and transition of ``model`` for its fused
    subclass (again, after a module was replaced); returns their qualified names."""
    swapped = []
    for name, module in model.named_modules():
        restore(module)
        layers = _dense_patterns.dense_block(module)
        if layers is not None:
            _swap(module, FusedDenseBlock, fused_layers=tuple(layers))
            swapped.append(name)
            continue
        parts = _dense_patterns.transition(module)
        if parts is not None:
            _swap(module, FusedDenseTransition, fused_transition=parts)
            swapped.append(name)
    return swapped


FUSED = (FusedDenseBlock, FusedDenseTransition)


def recognised(m: nn.Module) -> bool:
    """Whether ``m`` is a dense block or transition :func:`fuse_dense` would swap (fused or not)."""
    return _dense_patterns.dense_block(m) is not None or _dense_patterns.transition(m) is not None


def find_dense(model: nn.Module) -> list[str]:
    """Qualified names of the dense blocks and transitions :func:`fuse_dense` would swap."""
    return [name for name, m in model.named_modules() if not isinstance(m, FUSED) and recognised(m)]


def dense_report(model: nn.Module) -> dict[int, str]:
    """``fusion_report``'s states of the BatchNorms in DenseNet blocks and transitions, by ``id``."""
    states = {}
    for name, m in model.named_modules():
        if isinstance(m, FusedDenseBlock):
            ok = m._layers_intact()
            norms = [bn for layer in m.fused_layers for bn in (layer.norm1, layer.norm2)]
        elif isinstance(m, FusedDenseTransition):
            ok = _intact(m, m.fused_transition.children)
            norms = [m.fused_transition.norm]
        else:
            layers, parts = _dense_patterns.dense_block(m), _dense_patterns.transition(m)
            norms = [bn for layer in layers or [] for bn in (layer.norm1, layer.norm2)]
            norms += [parts.norm] if parts else []
            why = _dense_patterns.why_not(m)
            for bn in norms:
                states[id(bn)] = f"fusable: in the dense module {name}"
            for bn in m.modules() if why else []:
                states.setdefault(id(bn), f"not fused: {why}")
            continue
        ok = ok and all(tracks_as_built(bn) for bn in norms)
        state = (f"fused: in the dense module {name} (BN + ReLU in the next conv's prologue, batch statistics "
                 "shared per feature map)") if ok else \
            f"not fused: a module of the fused dense module {name} was replaced or hooked (or a BN's " \
            "track_running_stats changed) since fuse, so it runs its own forward"
        states.update({id(bn): state for bn in norms})
    return states

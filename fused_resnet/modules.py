"""Drop-in fused modules: ``FusedBasicBlock`` / ``FusedBottleneck`` (torchvision's constructor,
attribute names and ``state_dict``) and the fused stem pieces that ``fuse`` swaps in.

A block is a chain of conv+BN layers with ReLUs between them and a residual add + ReLU at the
end. Fused, in training it runs as ``conv_bn`` ops that apply the previous BN+ReLU as their
prologue and compute their own BN statistics, closed by one ``bn_add_relu`` pass that also
applies the downsample branch's BN; in eval every BN is folded into its conv and each conv
applies bias, residual and ReLU in its epilogue. A conv's own bias (``nn.Conv2d(bias=True)``) is
absorbed by its BN (``ops.conv_bn``, ``ops.fold_bn``). Anything the fused path does not cover (another
norm layer, a custom downsample) runs exactly as the ``nn`` block would.
Serving state (BN folded once) is explicit: see ``inference.prepare_for_inference``.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.modules.batchnorm import _BatchNorm

from . import _activation, distributed, inference, ops, resnet_arch
from ._fused_away import (  # noqa: F401  (re-exported: the chain's pass-through modules)
    FUSED_AWAY_ACT,
    FusedAwayActivation,
    FusedAwayBatchNorm2d,
    FusedAwayHardswish,
    FusedAwayHardtanh,
    FusedAwayLeakyReLU,
    FusedAwayReLU,
    FusedAwayReLU6,
    FusedAwaySiLU,
    fused_away_forward,
)

_SYNC_FORWARDS = (nn.SyncBatchNorm.forward, distributed.SyncBatchNorm2d.forward)


def is_fusable_conv(conv: nn.Module, cls: type | None = None, bias: bool = False) -> bool:
    """A plain ``nn.Conv2d`` with numeric zero padding, and without bias unless ``bias`` (a conv whose
    BN absorbs its bias: ``conv_bn``, ``eval_conv``); ``cls``: the class to judge it by, by default its own."""
    return (
        (cls or type(conv)).forward is nn.Conv2d.forward
        and isinstance(conv, nn.Conv2d)
        and (bias or child(conv, "bias", "_parameters") is None)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


_MISSING = object()


def child(module: nn.Module, name: str, store: str = "_modules"):
    """``getattr(module, name, None)`` for a submodule (or, with ``store="_parameters"``, a
    parameter): read from the module's own registry dict first, because ``nn.Module.__getattr__``
    costs ~0.5 us a lookup and the fused modules check their structure on every forward. A name
    the registry lacks (torchvision's ``downsample=None`` is a plain attribute) goes to getattr."""
    value = module.__dict__[store].get(name, _MISSING)
    return getattr(module, name, None) if value is _MISSING else value


def is_fusable_bn(bn: nn.Module, channels: int) -> bool:
    """A plain ``nn.BatchNorm2d``, ``nn.SyncBatchNorm`` or ``distributed.SyncBatchNorm2d`` over ``channels``
    channels (synchronised ones merge their statistics across their process group, see ``distributed.py``)."""
    plain = isinstance(bn, nn.BatchNorm2d) and type(bn).forward is _BatchNorm.forward
    synced = not plain and distributed.is_sync_batch_norm(bn) and type(bn).forward in _SYNC_FORWARDS
    return (plain or synced) and bn.num_features == channels and tracks_as_built(bn)


def tracks_as_built(bn: nn.Module) -> bool:
    """Whether ``bn.track_running_stats`` agrees with its buffers, as a BN is built. Set to False after
    construction with the buffers kept, PyTorch's BN neither updates them nor counts the batch in
    training but still reads them in eval; the fused ops do not model that state, so such a BN runs
    unfused (checked on every call)."""
    return bn.track_running_stats == (child(bn, "running_mean", "_buffers") is not None)


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has hooks of its own (forward, forward pre-, backward, backward pre-). A module
    fused away never runs its own forward, so its hooks would not fire or not see what they expect: a
    fused module whose parts hold one runs unfused while they do."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


_GLOBAL_HOOKS = tuple(getattr(module_hooks, name, {}) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))
_warned: dict[str, bool] = {}


def warn_if_global_hooks() -> None:
    """Warn once per process when global module hooks (``register_module_forward_hook`` and friends)
    see a fused module run: they fire on the modules that run, and the modules fused away do not."""
    if any(_GLOBAL_HOOKS) and not _warned and not torch.compiler.is_compiling():
        _warned["global hooks"] = True
        warnings.warn(
            "fused_resnet: global module hooks are registered and a fused model is running: they fire on the "
            "modules that run, so not on the modules inside a fused residual block, and a fused chain's BN and "
            "ReLU pass on what its conv computed. For hooks that see every module as unfused, call "
            "fused_resnet.unfuse(model), or register them on the modules themselves (their block or chain then "
            "runs unfused while they are there).", stacklevel=3)


def fusable_pair(conv: nn.Module, bn: nn.Module) -> bool:
    """A conv -> BN pair the fused ops run (the conv's bias, if any, absorbed by the BN)."""
    return is_fusable_conv(conv, bias=True) and is_fusable_bn(bn, conv.out_channels)


def downsample_pair(downsample: nn.Module | None) -> tuple[nn.Conv2d, nn.BatchNorm2d] | None:
    """The (conv, bn) of a torchvision downsample ``Sequential(conv1x1, BatchNorm2d)``, if fusable."""
    if isinstance(downsample, nn.Sequential) and type(downsample).forward is nn.Sequential.forward:
        # The registry, not len() and [i]: Sequential's __getitem__ costs ~1.5 us, on every forward.
        children = downsample._modules
        if len(children) == 2:
            conv, bn = children.values()
            if fusable_pair(conv, bn):
                return conv, bn
    return None


def _conv_kwargs(conv: nn.Conv2d) -> dict:
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    # The buffers read from the module's dict (inference._get): nn.Module.__getattr__ costs ~0.5 us a
    # lookup, twice per BN on every eval forward.
    buffers = bn._buffers
    return ops.uses_batch_stats(bn.training, inference._get(bn, buffers, "running_mean"),
                                inference._get(bn, buffers, "running_var"))


def _momentum(bn: nn.BatchNorm2d) -> float | None:
    # nn.BatchNorm2d uses momentum=None as "cumulative average"; without tracking it uses 0.0.
    return bn.momentum if bn.momentum is not None or bn.num_batches_tracked is not None else 0.0


def conv_bn(x: torch.Tensor | ops.DeferredBN, conv: nn.Conv2d, bn: nn.BatchNorm2d,
            in_act: int = _activation.RELU) -> ops.DeferredBN:
    """``ops.conv_bn`` with the parameters and settings of the modules ``conv`` and ``bn`` (``in_act``:
    the activation a deferred ``x`` gets in the prologue)."""
    group = distributed.sync_group(bn, x.y if isinstance(x, ops.DeferredBN) else x)
    return ops.conv_bn(
        x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
        training=bn.training, momentum=_momentum(bn), eps=bn.eps, process_group=group,
        in_activation=in_act, bias=child(conv, "bias", "_parameters"), **_conv_kwargs(conv),
    )


def eval_conv(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module, residual: torch.Tensor | None, act: int,
              prepared: inference.PreparedConv | None = None) -> torch.Tensor:
    """``act(bn(conv(x)) + residual)`` (``act``: an ``_activation`` code) with the eval-mode ``bn``
    folded into the conv: by the prepared conv when given (``inference.prepare_for_inference``), else
    folded now; as plain ATen ops under ``torch.compile``/export/tracing (``inference.emits_aten``),
    else by ``conv_bias_act``."""
    if prepared is not None:
        return prepared(x, residual, act)
    weight, bias = ops.fold_bn(conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
                               child(conv, "bias", "_parameters"))
    if not inference.emits_aten():
        return ops.conv_bias_act(x, weight, bias, residual, activation=act, **_conv_kwargs(conv))
    out = F.conv2d(x, weight, bias.to(weight.dtype), conv.stride, conv.padding, conv.dilation, conv.groups)
    if residual is not None:
        out = out + residual
    return _activation.apply(out, act)


def _eval_pairs(chain, ds) -> list[tuple[nn.Conv2d, nn.Module]]:
    """The convs a block runs in eval, BN folded: the downsample pair ``ds``'s first (its output is the
    residual of the last conv), then the chain."""
    return [ds, *chain] if ds is not None else list(chain)


_UNSET = object()


def residual_forward(x: torch.Tensor, chain: list[tuple[nn.Conv2d, nn.BatchNorm2d]],
                     downsample: nn.Module | None, prepared: list[inference.PreparedConv] | None = None,
                     ds=_UNSET, act: int = _activation.RELU, gate=None) -> torch.Tensor:
    """``act(bn_k(conv_k(...act(bn_1(conv_1(x)))...)) + shortcut(x))``, fused (``act``: an
    ``_activation`` code, ReLU for torchvision's blocks); ``shortcut`` is the identity, a fusable
    ``downsample`` (conv1x1 + BN) or any other module. ``prepared``: the block's prepared convs (eval
    only, in ``_eval_pairs`` order); ``ds``: ``downsample_pair(downsample)`` when the caller has it
    already; ``gate``: None, or a function of the last BN as a ``DeferredBN`` giving a per-(sample,
    channel) factor of its output (``_gates.join_gate``)."""
    if ds is _UNSET:
        ds = downsample_pair(downsample)
    # A loop with early exit, not a list and a generator: this runs on every forward.
    batch_stats = ds is not None and _uses_batch_stats(ds[1])
    for _, bn in chain:
        batch_stats = batch_stats or _uses_batch_stats(bn)
    if not batch_stats:
        return _folded_residual_forward(x, chain, downsample, ds, prepared, act, gate)
    h: torch.Tensor | ops.DeferredBN = x
    for conv, bn in chain:
        h = conv_bn(h, conv, bn, act)
    g = gate(h) if gate is not None else None  # before the shortcut: the unfused order of random draws
    if ds is not None:
        shortcut = conv_bn(x, *ds)
    else:
        shortcut = x if downsample is None else downsample(x)
    return ops.bn_add_relu(h, shortcut, activation=act, gate=g)


def gated_join(z: torch.Tensor, residual: torch.Tensor | None, act: int, gate) -> torch.Tensor:
    """``act(gate(z) * z + residual)`` for a folded (eval) join whose BN output ``z`` a gate scales
    per sample and channel (the conv's epilogue cannot); ``act``: an ``_activation`` code. One
    ``bn_add_relu`` pass, or ATen ops where the fused ops would not be (``inference.emits_aten``)."""
    g = gate(ops.DeferredBN(z, None, None))
    if g is None:
        out = z if residual is None else z + residual
        return _activation.apply(out, act)
    if not inference.emits_aten():
        return ops.bn_add_relu(z, residual, activation=act, gate=g)
    out = z * g.reshape(z.shape[0], z.shape[1], 1, 1)
    out = out if residual is None else out + residual
    return _activation.apply(out, act)


def _folded_residual_forward(x, chain, downsample, ds, prepared, act, gate=None):
    prepared = iter(prepared or ())
    if ds is not None:
        shortcut = eval_conv(x, *ds, None, _activation.NONE, next(prepared, None))
    else:
        shortcut = x if downsample is None else downsample(x)
    h = x
    for i, (conv, bn) in enumerate(chain):
        last = i == len(chain) - 1
        if last and gate is not None:  # the gate scales the BN's output before the add
            return gated_join(eval_conv(h, conv, bn, None, _activation.NONE, next(prepared, None)), shortcut, act,
                              gate)
        h = eval_conv(h, conv, bn, shortcut if last else None, act, next(prepared, None))
    return h


class _FusedBlockMixin(inference.Preparable):
    """Shared by the fused blocks: adoption of an existing block, the choice of path, and the
    prepared state of serving (``inference.Preparable``)."""

    def _chain(self) -> list[tuple[nn.Module, nn.Module]]:
        raise NotImplementedError

    @classmethod
    def from_block(cls, block: nn.Module):
        """A fused block sharing ``block``'s submodules, parameters, buffers, hooks and attributes."""
        fused = cls.__new__(cls)
        fused.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in block.__dict__.items()})
        fused.__dict__["class_before_fuse"] = type(block)  # for ``unfuse``
        return fused

    def _fused_pairs(self):
        """``(chain, downsample pair or None)`` when the fused path covers this block as configured now,
        else None (checked on every call: a module replaced, or given a hook, since ``fuse`` makes the
        block run its own forward)."""
        # One pass with early exits and no lists: this runs on every forward, in the host time of
        # every block, and its result also gives the pairs that forward runs.
        relu, downsample = child(self, "relu"), child(self, "downsample")
        if type(relu) is not nn.ReLU or has_hooks(relu) or (downsample is not None and has_hooks(downsample)):
            return None
        chain = self._chain()
        for conv, bn in chain:
            if not fusable_pair(conv, bn) or has_hooks(conv) or has_hooks(bn):
                return None
        ds = downsample_pair(downsample)
        if ds is not None and (has_hooks(ds[0]) or has_hooks(ds[1])):
            return None
        return chain, ds

    def fusable(self) -> bool:
        """Whether the fused path covers this block as configured now (checked on every call)."""
        return self._fused_pairs() is not None

    def eval_pairs(self):
        pairs = self._fused_pairs()
        return [] if pairs is None else _eval_pairs(*pairs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = self._fused_pairs()
        if pairs is None:
            return super().forward(x)
        warn_if_global_hooks()
        chain, ds = pairs
        prepared, gate = None, self._join_gate()
        if "_prepared" in self.__dict__:  # the pairs of eval_pairs(), without checking fusable() again
            prepared = self.prepared_convs(_eval_pairs(chain, ds))
            if prepared is not None and gate is None and inference.all_eval(chain, ds):
                return inference.serve_block(x, prepared, ds is not None, child(self, "downsample"), self._act_code())
        return residual_forward(x, chain, child(self, "downsample"), prepared, ds, self._act_code(), gate)

    def _act_code(self) -> int:
        """The block's activation (torchvision's blocks: ReLU, checked by ``_fused_pairs``)."""
        return _activation.RELU

    def _join_gate(self):
        """None, or ``residual_forward``'s ``gate``: what scales the last BN's output per sample and
        channel before the add (timm's SE, an active DropPath; ``_foreign.FusedResidualBlock``)."""
        return None


class FusedBasicBlock(_FusedBlockMixin, resnet_arch.BasicBlock):
    """torchvision's ``BasicBlock`` (same signature, attributes and ``state_dict``), fused."""

    def _chain(self):
        m = self._modules  # not nn.Module.__getattr__: ~1 us a lookup, on every forward
        return [(m["conv1"], m["bn1"]), (m["conv2"], m["bn2"])]


class FusedBottleneck(_FusedBlockMixin, resnet_arch.Bottleneck):
    """torchvision's ``Bottleneck`` (same signature, attributes and ``state_dict``), fused."""

    def _chain(self):
        m = self._modules
        return [(m["conv1"], m["bn1"]), (m["conv2"], m["bn2"]), (m["conv3"], m["bn3"])]


Slot = tuple[nn.Module, str, nn.Module]  # (owner, name, module): while fused, owner._modules[name] is module


def slots_intact(slots) -> bool:
    """Whether every ``(owner, name, module)`` still has ``owner._modules[name] is module``."""
    # A loop with an early exit, not all() over a generator: runs several times a conv a forward.
    for owner, name, module in slots:
        if owner._modules.get(name) is not module:
            return False
    return True


class FusedConvBN2d(inference.Preparable, nn.Conv2d):
    """An ``nn.Conv2d`` that also applies the BN (and activation: ReLU, ReLU6 / Hardtanh(0, 6), SiLU,
    Hardswish or LeakyReLU(0.01 / 0.1), ``_activation.module_code``) its container calls right after it:
    ``fuse`` turns the conv into this class in place, so its parameter and ``state_dict`` key stay
    the conv's own. The BN module stays where it was (its class becomes a pass-through one, e.g.
    :class:`FusedAwayBatchNorm2d`) and is read through an unregistered reference, so its keys do not
    move either. The container (``stem_owner``) is one whose ``forward`` is known to call the conv,
    the BN and the activation in a row (``_patterns.py``): a model's stem, an ``nn.Sequential``, a
    timm ``ConvNormAct`` or block.

    The modules check on every call that the model still holds them where ``fuse`` found them
    (``fused_slots``, ``relu_slots``): if one was replaced since (``convert_sync_batchnorm`` after
    ``fuse``, a BN swapped for ``nn.Identity``, another activation), the others do their own work
    again, so the chain computes what the model now says instead of normalising twice or dropping
    a step. ``fuse`` called again re-fuses such a chain."""

    fused_bn: nn.BatchNorm2d
    fused_relu: bool  # whether an activation is fused (its slots: relu_slots)
    fused_act: int  # its code (_activation)
    fused_relu_module: nn.Module | None  # the activation module, when a separate one
    stem_owner: nn.Module  # the container whose forward calls conv, BN (and ReLU) in a row
    fused_slots: tuple[Slot, ...]  # where the container (and its parents) held the conv and the BN
    relu_slots: tuple[Slot, ...]  # where the modules between the BN and the ReLU, and the ReLU, were

    def fused_state(self) -> tuple[bool, bool]:
        """Whether this conv still applies the BN, and the ReLU: whether the model still holds
        this conv, the fused BN and (when fused) the ReLU where ``fuse`` found them, none of them
        with hooks (a hook registered after ``fuse`` on the conv or the BN makes the three run
        unfused while it is there, on the ReLU the ReLU: each hook sees what it would unfused)."""
        # Early exits, no generators: this runs three times a conv a forward (here, and in the
        # fused-away BN's and activation's forwards), ~2 -> ~1.4 us.
        if not self.bn_applied():
            return False, False
        if not (self.fused_relu and slots_intact(self.relu_slots)):
            return True, False
        for _, _, module in self.relu_slots:
            if has_hooks(module):
                return True, False
        return True, self._act_unchanged()

    def bn_applied(self) -> bool:
        """``fused_state()[0]``: whether this conv still applies the BN (the fused-away BN's question)."""
        if not slots_intact(self.fused_slots):
            return False
        # The conv's padding as fuse took it: a padding_mode or a string padding set since is applied by
        # nn.Conv2d's own forward only.
        bn = self.fused_bn
        return not (has_hooks(self) or has_hooks(bn)) and tracks_as_built(bn) and self.padding_mode == "zeros" \
            and not isinstance(self.padding, str)

    def _act_unchanged(self) -> bool:
        # The activation (the last of relu_slots) still computes the function of the code fused at
        # fuse time: a LeakyReLU's negative_slope or a Hardtanh's bounds set since would otherwise
        # leave the kernel applying the old one. Changed, the activation module does its own work.
        act = self.relu_slots[-1][2]
        return _activation.module_code(act, act.__dict__.get("class_before_fuse", type(act))) == \
            self.__dict__.get("fused_act", _activation.RELU)

    def eval_pairs(self):
        return [(self, self.fused_bn)] if self.fused_state()[0] else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn_intact, relu = self.fused_state()
        if not bn_intact:
            return nn.Conv2d.forward(self, x)
        warn_if_global_hooks()
        bn = self.fused_bn
        act = self.__dict__.get("fused_act", _activation.RELU) if relu else _activation.NONE
        if not _uses_batch_stats(bn):
            prepared = self.prepared_convs([(self, bn)]) if "_prepared" in self.__dict__ else None
            return prepared[0](x, None, act) if prepared else eval_conv(x, self, bn, None, act)
        return ops.bn_add_relu(conv_bn(x, self, bn), activation=act)

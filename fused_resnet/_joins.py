"""Residual joins outside ResNet blocks: ``act(bn(conv(body(x))) + shortcut(x))`` where the last BN,
the add and the activation run as one pass.

Recognised by the identity of the block's ``forward`` (never by name), as ``_patterns`` does:

- torchvision's MobileNetV2 ``InvertedResidual`` with ``use_res_connect``: ``x + conv(x)``, no activation
  (a linear bottleneck); the body is ``conv``'s children but the last conv and BN.
- torchvision's MobileNetV3 ``InvertedResidual`` with ``use_res_connect``: ``block(x) + x``; the body is
  ``block``'s children but the last (the projection's ``Conv2dNormActivation``, conv -> BN, no
  activation), SE included (it runs as it is).
- torchvision's RegNet ``ResBottleneckBlock``: ``activation(proj(x) + f(x))`` (``proj`` a conv -> BN or
  the identity); the body is ``f``'s ``a``, ``b`` and SE, the last conv and BN ``f.c``'s.
- timm's RegNet ``Bottleneck``: ``act3(drop_path(conv3(se(conv2(conv1(x))))) + downsample(x))``.
- timm's EfficientNet / MobileNetV3 ``InvertedResidual`` and ``DepthwiseSeparableConv`` with
  ``has_skip``: ``drop_path(bn(conv_pwl(...se(...)))) + x``, no activation after the add.

Fused, the block runs its body's modules as they are (their own conv -> BN chains are fused by
``fuse``'s chain rule), then the last conv's BN is *deferred*: in training ``bn_add_relu`` applies it,
the shortcut's BN (when the shortcut is a conv -> BN) and the add (and activation) in one pass, so the
normalised output is neither written nor saved; in eval both BNs are folded and the conv's epilogue
adds the shortcut. An activation the kernels do not apply (``_activation.module_code``: ReLU, ReLU6,
Hardtanh(0, 6), SiLU, Hardswish, LeakyReLU(0.01 / 0.1)) runs as its own module after the add. While a
timm DropPath drops (training, drop rate > 0) its per-sample keep-scale, drawn by the module itself
(the same random numbers as unfused), is the join's gate (``_gates``). Every call checks that the modules
are still where ``fuse`` found them and have no hooks, that the block's ``use_res_connect`` / ``has_skip``
keep their values and that the activation after the add still computes the function fused (a
LeakyReLU's slope); if not, the block runs its own forward (``fuse`` called again
fuses a join whose module was replaced anew, with the modules it holds then).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import _activation, _foreign, _gates, _patterns, distributed, inference, ops
from .modules import Slot, _uses_batch_stats, conv_bn, eval_conv, gated_join, has_hooks, is_fusable_conv, \
    slots_intact, warn_if_global_hooks


@dataclass
class Join:
    """Where a block's join lives: each a (container, child name) pair, resolved at fuse time."""

    body: list[tuple[nn.Module, str]]  # called in order on the block's input
    last: list[tuple[nn.Module, str]]  # the last conv and its BN
    shortcut: list[tuple[nn.Module, str]] | None  # a conv -> BN, or None for the identity
    guards: list[tuple[nn.Module, str]]  # containers the fused block no longer calls
    act: tuple[nn.Module, str] | None  # the activation after the add
    drop: tuple[nn.Module, str] | None  # timm's DropPath on the main branch
    other_shortcut: bool = False  # a shortcut that is neither the identity nor a conv -> BN
    # The block's own attributes its forward branches on to add at all (``use_res_connect``, ``has_skip``)
    # with their values at fuse time: a user who flips one gets the block's own forward (checked every call).
    flags: tuple[tuple[str, object], ...] = ()


def _seq(m) -> bool:
    return _patterns.is_own(m, nn.Sequential, "forward")


def _conv_norm_act(m) -> bool:
    """timm's ConvNormAct without anti-aliasing: ``bn(conv(x))``."""
    tml = _patterns.loaded_module("timm.layers.conv_bn_act")
    return tml is not None and _patterns.is_own(m, tml.ConvNormAct, "forward") and getattr(m, "aa", None) is None


def spec(m: nn.Module) -> Join | None:
    """The join of ``m`` if its forward is one read here and it adds (else None)."""
    tvm = _patterns.loaded_module("torchvision.models.mobilenetv2")
    tv3 = _patterns.loaded_module("torchvision.models.mobilenetv3")
    tvr = _patterns.loaded_module("torchvision.models.regnet")
    tmr = _patterns.loaded_module("timm.models.regnet")
    tme = _patterns.loaded_module("timm.models._efficientnet_blocks")
    if tvm is not None and _patterns.is_own(m, tvm.InvertedResidual, "forward"):
        seq = m._modules.get("conv")
        if not m.use_res_connect or not _seq(seq) or len(seq) < 3:
            return None
        names = list(seq._modules)
        return Join([(seq, n) for n in names[:-2]], [(seq, n) for n in names[-2:]], None, [(m, "conv")], None, None,
                    flags=_flags(m, "use_res_connect"))
    if tv3 is not None and _patterns.is_own(m, tv3.InvertedResidual, "forward"):
        seq = m._modules.get("block")
        if not m.use_res_connect or not _seq(seq) or len(seq) < 2:
            return None
        names = list(seq._modules)
        last = seq._modules[names[-1]]
        if not _seq(last) or len(last) != 2:  # the projection: conv -> BN and nothing after them
            return None
        return Join([(seq, n) for n in names[:-1]], [(last, n) for n in last._modules], None,
                    [(m, "block"), (seq, names[-1])], None, None, flags=_flags(m, "use_res_connect"))
    if tvr is not None and _patterns.is_own(m, tvr.ResBottleneckBlock, "forward"):
        f = m._modules.get("f")
        c = f._modules.get("c") if _seq(f) else None
        if not _seq(c) or len(c) != 2 or list(f._modules)[-1] != "c":
            return None
        proj = m._modules.get("proj")
        pair = _seq(proj) and len(proj) == 2
        return Join([(f, n) for n in list(f._modules)[:-1]], [(c, n) for n in c._modules],
                    [(proj, n) for n in proj._modules] if pair else None, [(m, "f"), (f, "c"), (m, "proj")],
                    (m, "activation"), None, other_shortcut=proj is not None and not pair)
    if tmr is not None and _patterns.is_own(m, tmr.Bottleneck, "forward"):
        c3, ds = m._modules.get("conv3"), m._modules.get("downsample")
        if ds is None or not _conv_norm_act(c3):  # no downsample: no add
            return None
        pair = _conv_norm_act(ds)
        return Join([(m, "conv1"), (m, "conv2"), (m, "se")], [(c3, "conv"), (c3, "bn")],
                    [(ds, "conv"), (ds, "bn")] if pair else None, [(m, "conv3"), (m, "downsample")], (m, "act3"),
                    (m, "drop_path"), other_shortcut=not pair and type(ds) is not nn.Identity)
    if tme is not None and (_patterns.is_own(m, tme.InvertedResidual, "forward")
                            or _patterns.is_own(m, tme.DepthwiseSeparableConv, "forward")):
        return _efficientnet_join(m, tme)
    return None


def _efficientnet_join(m: nn.Module, tme) -> Join | None:
    """timm's EfficientNet / MobileNetV3 blocks: ``drop_path(bn(conv(body(x)))) + x`` when ``has_skip``
    (no activation after the add; the last BN a ``BatchNormAct2d`` without its act)."""
    if not getattr(m, "has_skip", False):
        return None
    inverted = isinstance(m, tme.InvertedResidual)
    names = ["conv_s2d", "bn_s2d"] if m._modules.get("conv_s2d") is not None else []
    names += ["conv_pw", "bn1", "conv_dw", "bn2", "aa", "se"] if inverted else ["conv_dw", "bn1", "aa", "se"]
    last = ["conv_pwl", "bn3"] if inverted else ["conv_pw", "bn2"]
    if any(n not in m._modules for n in names + last):
        return None
    return Join([(m, n) for n in names], [(m, n) for n in last], None, [], None, (m, "drop_path"),
                flags=_flags(m, "has_skip"))


def _flags(m: nn.Module, *names: str) -> tuple[tuple[str, object], ...]:
    return tuple((n, getattr(m, n)) for n in names)


def flags_intact(m: nn.Module, join: Join) -> bool:
    """Whether the block's attributes ``join.flags`` still have the values ``fuse`` found."""
    return all(getattr(m, n, None) == v for n, v in join.flags)


def _get(slot) -> nn.Module | None:
    return None if slot is None else slot[0]._modules.get(slot[1])


def _plain_norm(bn: nn.Module, channels: int) -> bool:
    """A BN ``conv_bn`` can apply: nn.BatchNorm2d / SyncBatchNorm, or timm's BatchNormAct2d without act or drop."""
    if not _patterns.fusable_norm(bn, channels):
        return False
    return not _patterns.norm_act(bn) or (type(bn.act) is nn.Identity and type(bn.drop) is nn.Identity)


def _pair(slots) -> tuple[nn.Module, nn.Module]:
    return _get(slots[0]), _get(slots[1])


def why_not(join: Join) -> str | None:
    """Why the join cannot run fused (None: it can)."""
    if join.other_shortcut:
        return "its shortcut is neither the identity nor a conv -> BN"
    for what, slots in (("last", join.last), ("shortcut", join.shortcut)):
        if slots is None:
            continue
        conv, bn = _pair(slots)
        if not (is_fusable_conv(conv, bias=True) and _plain_norm(bn, conv.out_channels)):
            return f"its {what} conv -> BN is not a plain zero-padded Conv2d -> BatchNorm2d (no act)"
    if join.drop is not None and not _patterns.droppable(_get(join.drop), "DropPath"):
        return "its drop_path is not timm's"
    if any(m is not None and has_hooks(m) for m in _modules(join)):
        return "a module of the join has hooks"
    return None


def _modules(join: Join) -> list[nn.Module | None]:
    slots = join.last + (join.shortcut or []) + join.guards + [s for s in (join.act, join.drop) if s is not None]
    return [_get(s) for s in slots]


def find(model: nn.Module) -> tuple[dict[str, tuple[nn.Module, Join]], dict[int, str], set[int]]:
    """The joins ``fuse`` would fuse (by qualified name), why others are not (id(BN) -> why), and the ids
    of the conv / BN modules the fused joins (found now or fused before) apply, which the chain rule skips."""
    found, notes, reserved = {}, {}, set()
    for name, m in model.named_modules():
        join = m.__dict__.get("fused_join")
        if join is None and (join := spec(m)) is not None:
            reason = why_not(join)
            if reason is not None:
                notes[id(_get(join.last[1]))] = f"not with the residual add: {reason}"
                continue
            found[name] = (m, join)
        if join is not None:
            reserved.update(id(_get(s)) for s in join.last + (join.shortcut or []))
    return found, notes, reserved


def restore(m: nn.Module) -> None:
    """Give a fused join back its own class and drop its fused state, in place (``unfuse``)."""
    if isinstance(m, FusedResidualJoin):
        m.__class__ = type(m).__bases__[1]  # _foreign.subclass(mixin, base) has the bases (mixin, base)
        for key in [k for k in m.__dict__ if k.startswith("join_") or k in ("fused_join", "_prepared")]:
            del m.__dict__[key]


def release_broken(model: nn.Module) -> None:
    """Give every fused join one of whose modules was replaced since ``fuse`` (say by
    ``convert_sync_batchnorm``), or whose ``use_res_connect`` / ``has_skip`` was changed, back its own
    class, so that ``find`` judges it anew."""
    for m in model.modules():
        if isinstance(m, FusedResidualJoin) and not (slots_intact(m.join_slots) and flags_intact(m, m.fused_join)):
            restore(m)


def fuse_join(block: nn.Module, join: Join) -> None:
    distributed.adopt_sync_batch_norms(block)
    slots = [(owner, n, owner._modules.get(n)) for owner, n in
             join.body + join.last + (join.shortcut or []) + join.guards
             + [s for s in (join.act, join.drop) if s is not None]]
    act = _get(join.act)
    code = _activation.module_code(act)
    block.__class__ = _foreign.subclass(FusedResidualJoin, type(block))
    block.__dict__.update(fused_join=join, join_slots=tuple(slots), join_body=tuple(_get(s) for s in join.body),
                          join_last=_pair(join.last), join_shortcut=_pair(join.shortcut) if join.shortcut else None,
                          join_code=code or _activation.NONE,
                          join_act=None if code is not None or act is None or type(act) is nn.Identity else act,
                          join_drop=_get(join.drop),
                          join_hooked=tuple(m for m in _modules(join) if m is not None))


def join_forward(x: torch.Tensor, h: torch.Tensor, last, shortcut, act: int,
                 prepared: list[inference.PreparedConv] | None, drop: nn.Module | None = None) -> torch.Tensor:
    """``act(drop(bn(conv(h))) + shortcut(x))`` (``act``: an ``_activation`` code), ``shortcut`` a
    (conv, BN) pair or None (the identity), ``drop`` an active DropPath or None: its per-sample
    keep-scale is the join's gate (``_gates``), drawn before the shortcut runs, as unfused."""
    conv, bn = last
    gate = None if drop is None else (lambda d: _gates.join_gate(d, None, drop))
    if not _uses_batch_stats(bn) and (shortcut is None or not _uses_batch_stats(shortcut[1])):
        prepared = iter(prepared or ())
        residual = x if shortcut is None else eval_conv(x, *shortcut, None, _activation.NONE, next(prepared, None))
        if gate is not None:
            return gated_join(eval_conv(h, conv, bn, None, _activation.NONE, next(prepared, None)), residual, act,
                              gate)
        return eval_conv(h, conv, bn, residual, act, next(prepared, None))
    main = conv_bn(h, conv, bn)
    g = None if gate is None else gate(main)
    residual = x if shortcut is None else conv_bn(x, *shortcut)
    return ops.bn_add_relu(main, residual, activation=act, gate=g)


@_foreign.register_mixin
class FusedResidualJoin(inference.Preparable):
    """Mixed into a block ``spec`` recognises (see the module docstring): its last BN, the residual add
    and the activation in one pass; its own forward when the fused path does not apply."""

    fused_join: Join
    join_slots: tuple[Slot, ...]
    join_body: tuple[nn.Module, ...]
    join_last: tuple[nn.Module, nn.Module]
    join_shortcut: tuple[nn.Module, nn.Module] | None
    join_code: int  # the activation applied with the add (_activation code)
    join_act: nn.Module | None  # an activation the kernels do not apply, run after the add
    join_drop: nn.Module | None
    join_hooked: tuple[nn.Module, ...]

    def fusable(self) -> bool:
        """Whether the modules are where ``fuse`` found them, hook-free and still fusable (checked on
        every call); an active DropPath is the join's gate."""
        if not slots_intact(self.join_slots) or any(has_hooks(m) for m in self.join_hooked):
            return False
        if not flags_intact(self, self.fused_join):
            return False
        # The activation after the add still the function whose code the kernels apply (a LeakyReLU's
        # slope, a ReLU6's bounds may be set after fuse); one the kernels do not apply runs as itself.
        act = _get(self.fused_join.act)
        if self.join_act is None and act is not None and (_activation.module_code(act) or _activation.NONE) \
                != self.join_code:
            return False
        return all(is_fusable_conv(c, bias=True) and _plain_norm(b, c.out_channels)
                   for c, b in (self.join_last,) + ((self.join_shortcut,) if self.join_shortcut else ()))

    def eval_pairs(self):
        return ([self.join_shortcut] if self.join_shortcut else []) + [self.join_last] if self.fusable() else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fusable():
            return super().forward(x)
        warn_if_global_hooks()
        h = x
        for module in self.join_body:
            h = module(h)
        prepared = None
        if "_prepared" in self.__dict__:
            prepared = self.prepared_convs(([self.join_shortcut] if self.join_shortcut else []) + [self.join_last])
        drop = None if _foreign.inactive(self.join_drop) else self.join_drop
        out = join_forward(x, h, self.join_last, self.join_shortcut, self.join_code, prepared, drop)
        return out if self.join_act is None else self.join_act(out)

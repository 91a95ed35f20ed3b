"""The containers whose ``forward`` ``fuse`` knows, and the *runs* of children each forward calls one
after the other, each on the previous one's output and nothing else reading it in between.

A container's ``forward`` is known when it *is* (by identity, never by name) the forward of a class
read here: ``nn.Sequential`` (so torchvision's ``Conv2dNormActivation``, ``BottleneckTransform``,
MobileNetV2's ``features`` and timm's downsamples), torchvision's and our ResNet stems and blocks,
timm's ``ResNet`` stem, ``BasicBlock``/``Bottleneck`` and ``ConvNormAct``, timm's ``EfficientNet``
(stem and head), ``MobileNetV3`` (stem; its head conv has a bias and no BN unless built with
``head_norm``), their ``features_only`` forms (``EfficientNetFeatures``, ``MobileNetV3Features``: the
stem) and their ``ConvBnAct`` / ``DepthwiseSeparableConv`` / ``InvertedResidual`` blocks, timm's
``SeparableConvNormAct``, the stems of its ``HighResolutionNet`` and ``GhostNet``, and its
``FeatureListNet`` / ``FeatureDictNet`` (``features_only`` of the other models: the wrapped model's
children called in order, runs broken after each module whose output is collected).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from torch import nn

from . import resnet_arch
from .modules import FusedConvBN2d, Slot


@dataclass
class Run:
    slots: list[tuple[nn.Module, str]]  # (container, child name), called in this order
    guards: list[Slot] = field(default_factory=list)  # modules that must stay where they are



def loaded_module(name: str):
    """The module ``name`` if it is imported already (a model of it can exist only then), else None."""
    return sys.modules.get(name)


def is_own(module: nn.Module, cls: type | None, *methods: str) -> bool:
    """``module`` is a ``cls`` whose ``methods`` are ``cls``'s own (a subclass may add others)."""
    return _own_type(type(module), cls, *methods)


def _own_type(t: type, cls: type | None, *methods: str) -> bool:
    return cls is not None and issubclass(t, cls) and all(getattr(t, m, None) is getattr(cls, m, None) for m in methods)


def _named(*groups):
    return lambda m: [Run([(m, n) for n in group]) for group in groups]


def _stem(act: str):
    """conv1 -> bn1 -> act of a ResNet; conv1 may be a Sequential ending in the conv (ResNet-D's deep stem)."""
    def runs(m):
        conv = m._modules.get("conv1")
        if isinstance(conv, nn.Sequential) and type(conv).forward is nn.Sequential.forward and len(conv):
            return [Run([(conv, list(conv._modules)[-1]), (m, "bn1"), (m, act)], [(m, "conv1", conv)])]
        return [Run([(m, "conv1"), (m, "bn1"), (m, act)])]
    return runs


_TV_BASIC, _TV_BOTTLENECK = _named(("conv1", "bn1"), ("conv2", "bn2")), _named(
    ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))  # their one ReLU module is used 2-3 times: not fused


def known_runs(m: nn.Module) -> list[Run] | None:
    """The runs of ``m``'s children that its forward calls in a row; None when its forward is not known."""
    if is_own(m, nn.Sequential, "forward"):
        return [Run([(m, name) for name in m._modules])]
    tvr, tmr = loaded_module("torchvision.models.resnet"), loaded_module("timm.models.resnet")
    tml = loaded_module("timm.layers.conv_bn_act")
    for cls in (resnet_arch.ResNet, getattr(tvr, "ResNet", None)):
        if is_own(m, cls, "forward", "_forward_impl"):
            return _stem("relu")(m)
    for cls, runs in ((resnet_arch.BasicBlock, _TV_BASIC), (resnet_arch.Bottleneck, _TV_BOTTLENECK),
                      (getattr(tvr, "BasicBlock", None), _TV_BASIC),
                      (getattr(tvr, "Bottleneck", None), _TV_BOTTLENECK)):
        if is_own(m, cls, "forward"):
            return runs(m)
    if tmr is not None:
        if is_own(m, tmr.ResNet, "forward", "forward_features", "forward_intermediates"):
            return _stem("act1")(m)
        if is_own(m, tmr.BasicBlock, "forward"):  # drop_block sits between bn1 and act1
            return _named(("conv1", "bn1", "drop_block", "act1"), ("conv2", "bn2"))(m)
        if is_own(m, tmr.Bottleneck, "forward"):
            return _named(("conv1", "bn1", "act1"), ("conv2", "bn2", "drop_block", "act2"), ("conv3", "bn3"))(m)
    if tml is not None and is_own(m, tml.ConvNormAct, "forward"):
        return _named(("conv", "bn"))(m)
    runs = _timm_stem_runs(m)
    if runs is not None:
        return runs
    runs = _efficientnet_runs(m)
    if runs is not None:
        return runs
    runs = _feature_net_runs(m)
    if runs is not None:
        return runs
    if not isinstance(m, FusedConvBN2d) and isinstance(m._modules.get("conv1"), nn.Conv2d) and hasattr(m, "layer1"):
        # fuse's first rule, kept: a ResNet-like model (conv1, bn1, layer1) calls bn1 on conv1's output.
        return [Run([(m, "conv1"), (m, "bn1")])]
    return None


def _timm_stem_runs(m: nn.Module) -> list[Run] | None:
    """timm's ``SeparableConvNormAct`` (``bn(conv_pw(conv_dw(x)))``), ``HighResolutionNet``'s and ``GhostNet``'s stems."""
    tsc, thr, tgh = (loaded_module(f"timm.{n}") for n in ("layers.separable_conv", "models.hrnet", "models.ghostnet"))
    if tsc is not None and is_own(m, tsc.SeparableConvNormAct, "forward"):
        return _named(("conv_dw", "conv_pw", "bn"))(m)
    if thr is not None and is_own(m, thr.HighResolutionNet, "forward", "forward_features"):
        return _named(("conv1", "bn1", "act1"), ("conv2", "bn2", "act2"))(m)
    if tgh is not None and is_own(m, tgh.GhostNet, "forward", "forward_features"):
        return _named(("conv_stem", "bn1", "act1"))(m)
    return None


def _efficientnet_runs(m: nn.Module) -> list[Run] | None:
    """timm's EfficientNet family (MobileNetV3 shares its blocks): the stems and heads (conv ->
    BatchNormAct2d) and the blocks' conv -> BN pairs (their SE, anti-aliasing and skip add run as they are)."""
    tme, tmb = loaded_module("timm.models.efficientnet"), loaded_module("timm.models._efficientnet_blocks")
    tmm = loaded_module("timm.models.mobilenetv3")
    if tme is not None and is_own(m, tme.EfficientNet, "forward", "forward_features"):
        return _named(("conv_stem", "bn1"), ("conv_head", "bn2"))(m)
    # features_only: the stem, then the blocks (features collected after the stem's BatchNormAct2d)
    if (tme is not None and is_own(m, tme.EfficientNetFeatures, "forward")) or (
            tmm is not None and is_own(m, tmm.MobileNetV3Features, "forward")):
        return _named(("conv_stem", "bn1"))(m)
    if tmm is not None and is_own(m, tmm.MobileNetV3, "forward", "forward_features", "forward_head"):
        # forward_head: global_pool -> conv_head -> norm_head -> act2 (norm_head a BN only with head_norm)
        return _named(("conv_stem", "bn1"), ("conv_head", "norm_head", "act2"))(m)
    if tmb is None:
        return None
    # A block whose skip add runs fused (``_joins.FusedResidualJoin`` mixed into its class: the bases
    # are (mixin, the block's class)) keeps the runs of its own forward for its body.
    block = type(m).__bases__[-1] if "fused_join" in m.__dict__ else type(m)
    if is_own(m, tmb.ConvBnAct, "forward"):  # conv -> bn1 (BatchNormAct2d) -> aa, then the skip add
        return _named(("conv", "bn1"))(m)
    if _own_type(block, tmb.DepthwiseSeparableConv, "forward"):
        return _named(("conv_s2d", "bn_s2d"), ("conv_dw", "bn1"), ("conv_pw", "bn2"))(m)
    if _own_type(block, tmb.InvertedResidual, "forward"):
        return _named(("conv_s2d", "bn_s2d"), ("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))(m)
    return None


def _feature_net_runs(m: nn.Module) -> list[Run] | None:
    """timm's ``FeatureDictNet`` / ``FeatureListNet`` (``features_only``): the wrapped model's top-level
    children called in order (one by one under gradient checkpointing too), the output of each
    ``return_layers`` module collected: a run ends after such a module, so that what is collected is
    what the module computes unfused (a BN's output without the activation after it). A child
    Sequential ending in a conv (ResNet-D's deep stem) takes part by that conv, as in ``_stem``."""
    tfe = loaded_module("timm.models._features")
    if tfe is None or not is_own(m, tfe.FeatureDictNet, "_collect") or not isinstance(
            getattr(m, "return_layers", None), dict):
        return None
    runs, slots, guards = [], [], []
    for name, child in m._modules.items():
        if isinstance(child, nn.Sequential) and type(child).forward is nn.Sequential.forward and len(child) \
                and isinstance(list(child._modules.values())[-1], nn.Conv2d):
            runs.append(Run(slots, guards))
            slots, guards = [(child, list(child._modules)[-1])], [(m, name, child)]
        else:
            slots.append((m, name))
        if name in m.return_layers:
            runs.append(Run(slots, guards))
            slots, guards = [], []
    runs.append(Run(slots, guards))
    return [r for r in runs if len(r.slots) > 1]

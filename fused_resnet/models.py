"""Constructors of ResNets with torchvision's structure, attribute names and ``state_dict`` keys
(the architecture is ``resnet_arch.py``). ``resnet18(...)`` and friends return the fused model;
``fused=False`` gives the plain ``nn`` one (the baseline of benchmarks and ``train --compare``).
Checkpoints load both ways with torchvision's models."""

from __future__ import annotations

from .fuse import fuse
from .resnet_arch import BasicBlock, Bottleneck, ResNet, conv1x1, conv3x3

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "conv1x1", "conv3x3", "resnet18", "resnet34", "resnet50", "resnet101",
           "resnext50_32x4d", "wide_resnet50_2"]


def _build(block, layers, fused: bool, **kwargs) -> ResNet:
    model = ResNet(block, layers, **kwargs)
    return fuse(model) if fused else model


def resnet18(*, fused: bool = True, **kwargs) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); ``kwargs`` as torchvision's ``ResNet``."""
    return _build(BasicBlock, [2, 2, 2, 2], fused, **kwargs)


def resnet34(*, fused: bool = True, **kwargs) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3])."""
    return _build(BasicBlock, [3, 4, 6, 3], fused, **kwargs)


def resnet50(*, fused: bool = True, **kwargs) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3])."""
    return _build(Bottleneck, [3, 4, 6, 3], fused, **kwargs)


def resnet101(*, fused: bool = True, **kwargs) -> ResNet:
    """ResNet-101 (Bottleneck, [3, 4, 23, 3])."""
    return _build(Bottleneck, [3, 4, 23, 3], fused, **kwargs)


def resnext50_32x4d(*, fused: bool = True, **kwargs) -> ResNet:
    """ResNeXt-50 32x4d (grouped 3x3 convs)."""
    return _build(Bottleneck, [3, 4, 6, 3], fused, groups=32, width_per_group=4, **kwargs)


def wide_resnet50_2(*, fused: bool = True, **kwargs) -> ResNet:
    """Wide ResNet-50-2 (bottleneck width doubled)."""
    return _build(Bottleneck, [3, 4, 6, 3], fused, width_per_group=128, **kwargs)

"""Narrow ResNets for small images (the CIFAR-style ResNets of He et al., 2016): a 3x3 stride-1
stem with no max-pool, then stages of torchvision ``BasicBlock``s whose widths double while the
resolution halves. ``train``'s default model is ``small_resnet()`` (widths 16-32-64, one block per
stage, ~80k parameters), which learns the upscaled digits in seconds on a CPU.

Attribute and ``state_dict`` names follow torchvision (``conv1``, ``bn1``, ``layer<i>``, ``fc``),
so ``fuse`` swaps every block and the stem conv+BN exactly as in a torchvision ResNet; the stem's
ReLU stays a separate module because ``fuse`` only folds it for forwards it knows.
"""

from __future__ import annotations

import torch
from torch import nn

from .fuse import fuse
from .resnet_arch import BasicBlock, conv1x1, conv3x3


class SmallResNet(nn.Module):
    """``conv3x3 -> BN -> ReLU -> layer1..layerK -> global average pool -> fc``.

    Stage ``i`` has ``blocks[i]`` BasicBlocks of width ``widths[i]``; every stage after the first
    halves the resolution in its first block (with a conv1x1+BN downsample, as torchvision does).
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: tuple[int, ...] = (1, 1, 1),
                 num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths {widths} and blocks {blocks} must be non-empty and of one length")
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(count):
                downsample = None
                if j == 0 and (stride != 1 or inplanes != width):
                    downsample = nn.Sequential(conv1x1(inplanes, width, stride), nn.BatchNorm2d(width))
                layers.append(BasicBlock(inplanes, width, stride if j == 0 else 1, downsample))
                inplanes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def small_resnet(*, fused: bool = True, widths: tuple[int, ...] = (16, 32, 64), blocks: tuple[int, ...] = (1, 1, 1),
                 num_classes: int = 10, in_channels: int = 3) -> SmallResNet:
    """A :class:`SmallResNet`, fused in place by :func:`fused_resnet.fuse` unless ``fused=False``."""
    model = SmallResNet(widths, blocks, num_classes, in_channels)
    return fuse(model) if fused else model

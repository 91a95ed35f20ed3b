"""What ``fuse`` recognises of DenseNets: torchvision's ``_DenseBlock`` / ``_DenseLayer`` /
``_Transition`` and timm's ``DenseBlock`` / ``DenseLayer`` / ``DenseTransition``.

As in ``_patterns.py``, a module is recognised by the identity of its ``forward`` (a subclass that
overrides it is not), never by name, and by its children: each layer must compute
``conv2(relu(bn2(conv1(relu(bn1(cat(features)))))))`` with plain ``nn.BatchNorm2d`` norms (timm:
``BatchNormAct2d`` with an ``nn.ReLU`` and no drop), a bias-free 1x1 ``conv1`` and a bias-free
``conv2`` that keeps the spatial size, and the layers' channel counts must chain (layer ``i`` reads
``C_0 + sum of the growths before it`` channels). A transition is ``norm -> relu -> 1x1 conv ->
pool`` (timm: ``norm`` a ``BatchNormAct2d`` with its ReLU). Other libraries are looked up in
``sys.modules`` only (fused_resnet imports neither).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from ._patterns import is_own, loaded_module, norm_act
from .modules import is_fusable_bn, is_fusable_conv


class DenseLayerModules(NamedTuple):
    """One dense layer as the fused block runs it; ``children`` is the layer's own children as
    ``fuse`` found them (a replaced child makes the block run its own forward)."""

    layer: nn.Module
    norm1: nn.BatchNorm2d
    conv1: nn.Conv2d
    norm2: nn.BatchNorm2d
    conv2: nn.Conv2d
    children: tuple[nn.Module, ...]


class TransitionModules(NamedTuple):
    norm: nn.BatchNorm2d
    conv: nn.Conv2d
    pool: nn.Module
    children: tuple[nn.Module, ...]


def _tv():
    return loaded_module("torchvision.models.densenet")


def _timm():
    return loaded_module("timm.models.densenet")


def _relu_norm(bn: nn.Module, channels: int) -> bool:
    """A BN over ``channels`` channels the fused path can apply with a ReLU after it: a plain
    BatchNorm2d (the ReLU is a separate module), or timm's BatchNormAct2d with nn.ReLU and no drop."""
    if norm_act(bn):
        return bn.num_features == channels and type(bn.act) is nn.ReLU and type(bn.drop) is nn.Identity
    return is_fusable_bn(bn, channels) and type(bn) is nn.BatchNorm2d


def _same_size(conv: nn.Conv2d) -> bool:
    """A stride-1 conv whose output has its input's height and width."""
    return conv.stride == (1, 1) and all(
        2 * p == d * (k - 1) for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size))


def dense_layer(layer: nn.Module) -> DenseLayerModules | None:
    """The modules of a torchvision ``_DenseLayer`` or timm ``DenseLayer`` the fused block can run."""
    tv, tm = _tv(), _timm()
    children = dict(layer.named_children())
    if tv is not None and is_own(layer, tv._DenseLayer, "forward", "bn_function"):
        names, relus = ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2"), ("relu1", "relu2")
    elif tm is not None and is_own(layer, tm.DenseLayer, "forward", "bottleneck_fn"):
        names, relus = ("norm1", "conv1", "norm2", "conv2"), ()
    else:
        return None
    if tuple(children) != names or any(type(children[r]) is not nn.ReLU for r in relus):
        return None
    norm1, conv1, norm2, conv2 = (children[n] for n in ("norm1", "conv1", "norm2", "conv2"))
    if not (is_fusable_conv(conv1) and is_fusable_conv(conv2) and conv1.kernel_size == (1, 1)
            and conv1.groups == 1 and _same_size(conv1) and _same_size(conv2)
            and conv2.in_channels == conv1.out_channels
            and _relu_norm(norm1, conv1.in_channels) and _relu_norm(norm2, conv1.out_channels)):
        return None
    return DenseLayerModules(layer, norm1, conv1, norm2, conv2, tuple(children.values()))


def dense_block(block: nn.Module) -> list[DenseLayerModules] | None:
    """The layers of a torchvision ``_DenseBlock`` / timm ``DenseBlock`` whose every layer is a
    fusable dense layer with chained channel counts; None otherwise."""
    tv, tm = _tv(), _timm()
    if not ((tv is not None and is_own(block, tv._DenseBlock, "forward"))
            or (tm is not None and is_own(block, tm.DenseBlock, "forward"))):
        return None
    layers = [dense_layer(m) for m in block._modules.values()]
    if not layers or any(layer is None for layer in layers):
        return None
    channels = layers[0].conv1.in_channels
    for layer in layers:
        if layer.conv1.in_channels != channels:
            return None
        channels += layer.conv2.out_channels
    return layers


def transition(m: nn.Module) -> TransitionModules | None:
    """The (norm, conv, pool) of a torchvision ``_Transition`` / timm ``DenseTransition``."""
    tv, tm = _tv(), _timm()
    children = dict(m.named_children())
    if tv is not None and is_own(m, tv._Transition, "forward"):
        names = ("norm", "relu", "conv", "pool")
    elif tm is not None and is_own(m, tm.DenseTransition, "forward"):
        names = ("norm", "conv", "pool")
    else:
        return None
    if tuple(children) != names or ("relu" in children and type(children["relu"]) is not nn.ReLU):
        return None
    norm, conv, pool = children["norm"], children["conv"], children["pool"]
    if not (is_fusable_conv(conv) and conv.kernel_size == (1, 1) and _relu_norm(norm, conv.in_channels)):
        return None
    return TransitionModules(norm, conv, pool, tuple(children.values()))


def why_not(m: nn.Module) -> str | None:
    """For a DenseNet block or transition that :func:`dense_block` / :func:`transition` refuses, why."""
    tv, tm = _tv(), _timm()
    block_classes = [c for c in (getattr(tv, "_DenseBlock", None), getattr(tm, "DenseBlock", None)) if c]
    transition_classes = [c for c in (getattr(tv, "_Transition", None), getattr(tm, "DenseTransition", None)) if c]
    if isinstance(m, tuple(block_classes)) and dense_block(m) is None:
        return "a layer of its dense block is not norm -> ReLU -> 1x1 conv -> norm -> ReLU -> conv with plain " \
               "BatchNorm2d and bias-free, size-keeping convs"
    if isinstance(m, tuple(transition_classes)) and transition(m) is None:
        return "its transition is not BatchNorm2d -> ReLU -> bias-free 1x1 conv -> pool"
    return None

"""``fuse(model)``: swap, in place, the residual blocks and the stem of an existing model for fused
ones that share its very parameter and buffer tensors.

Blocks are recognised by structure, not class: any module whose children are exactly
torchvision's ``BasicBlock`` (``conv1 bn1 relu conv2 bn2 [downsample]``) or ``Bottleneck``
(``conv1 bn1 conv2 bn2 conv3 bn3 relu [downsample]``) with consistent channel counts, so a
user's own copy of the torchvision block is swapped too. The fused block computes what
torchvision's ``forward`` computes; a module with the same children but another ``forward``
would be misread, which is why the structure test is strict. Stems are fused as conv+BN (and the
ReLU too when the model's class is torchvision's or our ``ResNet``, whose ``forward`` is known).
"""

from __future__ import annotations

import logging
import sys

from torch import nn

from . import distributed, resnet_arch
from .distributed import FusedAwaySyncBatchNorm2d
from .modules import (
    FusedAwayBatchNorm2d,
    FusedAwayReLU,
    FusedBasicBlock,
    FusedBottleneck,
    FusedConvBN2d,
    fusable_pair,
)

log = logging.getLogger("fused_resnet")

_BASIC = ("conv1", "bn1", "relu", "conv2", "bn2")
_BOTTLENECK = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu")


def _children(module: nn.Module) -> dict[str, nn.Module | None]:
    names = dict(module.named_children())
    names.update({k: None for k, v in module._modules.items() if v is None})
    return names


def _block_class(module: nn.Module) -> type | None:
    """FusedBasicBlock / FusedBottleneck if ``module`` has that torchvision structure, else None."""
    if isinstance(module, (FusedBasicBlock, FusedBottleneck)):
        return None
    children = _children(module)
    names = set(children) - {"downsample"}
    for fused_cls, order in ((FusedBasicBlock, _BASIC), (FusedBottleneck, _BOTTLENECK)):
        if names != set(order) or type(children["relu"]) is not nn.ReLU:
            continue
        convs = [children[n] for n in order if n.startswith("conv")]
        bns = [children[n] for n in order if n.startswith("bn")]
        if not all(fusable_pair(c, b) for c, b in zip(convs, bns)):
            return None
        if any(a.out_channels != b.in_channels for a, b in zip(convs, convs[1:])):
            return None
        if fused_cls is FusedBasicBlock and any(c.kernel_size != (3, 3) for c in convs):
            return None
        if fused_cls is FusedBottleneck and (convs[0].kernel_size, convs[2].kernel_size) != ((1, 1), (1, 1)):
            return None
        # Without a downsample the block adds its input to its output: shapes must agree.
        if children.get("downsample") is None and (
            convs[0].in_channels != convs[-1].out_channels or any(c.stride != (1, 1) for c in convs)
        ):
            return None
        return fused_cls
    return None


def _known_resnet_forward(model: nn.Module) -> bool:
    """True when ``model``'s forward is torchvision's or our ``ResNet``'s (ReLU used once, after bn1)."""
    classes = [resnet_arch.ResNet]
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is not None:
        classes.append(tv.ResNet)
    for cls in classes:
        if type(model).forward is cls.forward and getattr(type(model), "_forward_impl", None) is getattr(
            cls, "_forward_impl", None
        ):
            return True
    return False


def _has_stem(model: nn.Module) -> bool:
    """A ResNet-like model (it has ``layer1``) whose ``conv1``/``bn1`` stem is fusable and not fused."""
    conv, bn = getattr(model, "conv1", None), getattr(model, "bn1", None)
    return (
        isinstance(conv, nn.Module) and isinstance(bn, nn.Module) and hasattr(model, "layer1")
        and not isinstance(conv, FusedConvBN2d) and fusable_pair(conv, bn) and _block_class(model) is None
    )


def _broken_stem(model: nn.Module) -> FusedConvBN2d | None:
    """``model``'s fused stem conv if a module of that stem was replaced since ``fuse`` (say by
    ``convert_sync_batchnorm``): it then runs unfused (``FusedConvBN2d.fused_state``) until fused anew."""
    conv = model._modules.get("conv1")
    if isinstance(conv, FusedConvBN2d) and (conv.stem_owner is not model or conv.fused_state() != (True, conv.fused_relu)):
        return conv
    return None


def _fuse_stem(model: nn.Module) -> bool:
    if not _has_stem(model):
        return False
    conv, bn, relu = model.conv1, model.bn1, getattr(model, "relu", None)
    fuse_relu = _known_resnet_forward(model) and type(relu) is nn.ReLU
    stem = [conv, bn] + ([relu] if fuse_relu else [])
    for module in stem:
        module.__dict__["class_before_fuse"] = type(module)
    conv.__class__ = FusedConvBN2d
    # Unregistered references: the state_dict keys stay model.conv1/bn1.*, and no module cycle is
    # registered. The stem modules check them on every call (FusedConvBN2d.fused_state).
    conv.__dict__.update(fused_bn=bn, fused_relu=fuse_relu, fused_relu_module=relu if fuse_relu else None,
                         stem_owner=model, stem_modules=stem)
    bn.__class__ = FusedAwaySyncBatchNorm2d if distributed.is_sync_batch_norm(bn) else FusedAwayBatchNorm2d
    bn.__dict__["fused_into"] = conv
    if fuse_relu:
        relu.__class__ = FusedAwayReLU
        relu.__dict__["fused_into"] = conv
    return True


def _unfuse_stem(conv: FusedConvBN2d) -> None:
    """Give each module of a fused stem back the class it had before ``fuse``."""
    for module in conv.stem_modules:
        module.__class__ = module.__dict__.pop("class_before_fuse")
        for attr in ("fused_into", "fused_bn", "fused_relu", "fused_relu_module", "stem_owner", "stem_modules"):
            module.__dict__.pop(attr, None)


def find_fusable(model: nn.Module) -> list[str]:
    """Qualified names of the modules of ``model`` that :func:`fuse` would swap."""
    names = [name for name, m in model.named_modules() if name and _block_class(m) is not None]
    stems = [name for name, m in model.named_modules() if _has_stem(m) or _broken_stem(m) is not None]
    return names + [f"{name}.conv1" if name else "conv1" for name in stems]


def fuse(model: nn.Module, *, verbose: bool = False) -> nn.Module:
    """Swap, in place, every torchvision-structured ``BasicBlock``/``Bottleneck`` of ``model`` for
    ``FusedBasicBlock``/``FusedBottleneck`` and fuse the stem conv+BN(+ReLU); parameters, buffers
    and ``state_dict`` keys are unchanged. Returns ``model``. What was swapped is logged on the
    ``fused_resnet`` logger (INFO), and printed when ``verbose``; unrecognised modules are left
    as they are. A block passed as ``model`` itself cannot be swapped in place: the fused block
    (sharing its tensors) is returned instead."""
    top = _block_class(model)
    if top is not None:
        fused = top.from_block(model)
        distributed.adopt_sync_batch_norms(fused)  # nn.SyncBatchNorm -> SyncBatchNorm2d: runs on CPU/DDP too
        return fused
    swapped: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            fused_cls = _block_class(child)
            if fused_cls is not None:
                setattr(parent, child_name, fused_cls.from_block(child))
                distributed.adopt_sync_batch_norms(getattr(parent, child_name))
                swapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    for name, module in list(model.named_modules()):
        broken = _broken_stem(module)
        if broken is not None:
            _unfuse_stem(broken)
        if _fuse_stem(module):
            swapped.append(f"{name}.conv1" if name else "conv1")
    message = f"fused_resnet.fuse: swapped {len(swapped)} module(s): {', '.join(swapped) or 'none'}"
    log.info(message)
    if verbose:
        print(message)
    return model

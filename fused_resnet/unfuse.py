"""``unfuse(model)``: the plain model back from a fused one, for tools that need the ``nn`` modules
(FX passes, quantisation, a model shipped without fused_resnet installed).

The inverse of :func:`fused_resnet.fuse`, in place: every module gets back the class it had before
``fuse`` (a torchvision ``BasicBlock`` its torchvision class, a timm block its timm class, a chain's
conv, BN and ReLU theirs), holding the very same parameter and buffer tensors under the same
``state_dict`` keys, so that a model fine-tuned fused and then unfused computes what the plain model
computes with those tensors, bit for bit (it *is* the plain model). Blocks built fused
(``fused_resnet.resnet50()``) become ``resnet_arch``'s plain ``BasicBlock`` / ``Bottleneck``
(torchvision's structure and forward). Prepared serving state is dropped. Left as they are: the
``nn.SyncBatchNorm`` modules that ``fuse`` turned into ``distributed.SyncBatchNorm2d`` (the same
computation, and the class that runs on the CPU too).
"""

from __future__ import annotations

from torch import nn

from . import _joins, _traced_forward, dense
from .fuse import _unfuse_chain
from .inference import Preparable
from .modules import FusedConvBN2d, _FusedBlockMixin

_FUSED_STATE = ("class_before_fuse", "_prepared", "fused_names", "fused_acts")


def _plain_class(block: _FusedBlockMixin) -> type:
    """The class ``block`` had before ``fuse``: recorded when ``fuse`` swapped it, else the first
    class of its own that is not a fused one (``resnet_arch.BasicBlock``, timm's block)."""
    recorded = block.__dict__.get("class_before_fuse")
    if recorded is not None:
        return recorded
    return next(c for c in type(block).__mro__ if issubclass(c, nn.Module) and not issubclass(c, Preparable))


def _unfuse_block(block: _FusedBlockMixin) -> None:
    """Give ``block`` back its plain class, in place (the same object: references to it and the
    handles of hooks registered on it stay valid)."""
    cls = _plain_class(block)
    for key in _FUSED_STATE:
        block.__dict__.pop(key, None)
    block.__class__ = cls


def unfuse(model: nn.Module) -> nn.Module:
    """Undo :func:`fused_resnet.fuse` on ``model``, in place (see the module docstring), and return
    it; a model that was never fused is returned unchanged. Every module stays the same object: only
    classes change."""
    for module in list(model.modules()):
        if isinstance(module, FusedConvBN2d) and "stem_modules" in module.__dict__:
            module.__dict__.pop("_prepared", None)
            _unfuse_chain(module)
        elif isinstance(module, _FusedBlockMixin):
            _unfuse_block(module)
        elif isinstance(module, _joins.FusedResidualJoin):
            _joins.restore(module)  # MobileNetV2 / RegNet residual joins
        elif isinstance(module, _traced_forward.FusedTracedForward):
            _traced_forward.restore(module)  # residual adds in a user's own forward
        else:
            dense.restore(module)  # DenseNet blocks and transitions
    return model

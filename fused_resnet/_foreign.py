"""Fused subclasses of other libraries' classes (timm's blocks and ``BatchNormAct2d``), made on demand.

``fuse`` changes such a module's class in place to ``type(name, (mixin, original), {})``: the module
stays an instance of its own class (``isinstance``, its methods such as timm's ``zero_init_last``,
its attributes), and the mixin's ``forward`` falls back to the original one when the fused path
does not apply. fused_resnet imports neither timm nor torchvision, hence classes made at run time.
They are attributes of this module (PEP 562 ``__getattr__``) under a name that encodes the mixin and
the original class, so that a pickled fused model unpickles in a fresh process too.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from . import _activation, _gates, _patterns
from .modules import FusedConvBN2d, _FusedBlockMixin, child, downsample_pair

_MIXINS: dict[str, type] = {}
_CLASSES: dict[tuple[type, type], type] = {}
_SEP = "__of__"


def register_mixin(mixin: type) -> type:
    """Decorator: ``mixin`` may be combined with other classes by :func:`subclass`."""
    _MIXINS[mixin.__name__] = mixin
    return mixin


def _encode(base: type) -> str:
    # Pickle splits a class's qualified name on dots: the base's module and name are joined by "_x_".
    return f"{base.__module__}.{base.__qualname__}".replace(".", "_x_")


def subclass(mixin: type, base: type) -> type:
    """The class ``mixin`` + ``base`` (one per pair), an attribute of this module."""
    key = (mixin, base)
    if key not in _CLASSES:
        name = f"{mixin.__name__}{_SEP}{_encode(base)}"
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name})
        _CLASSES[key] = cls
        globals()[name] = cls
    return _CLASSES[key]


def __getattr__(name: str) -> type:
    """Re-create a class made by :func:`subclass` in another process (unpickling)."""
    mixin_name, sep, encoded = name.partition(_SEP)
    if not sep:
        raise AttributeError(name)
    path = encoded.replace("_x_", ".")
    module_name, _, qualname = path.rpartition(".")
    while module_name:  # the split between module and (nested) class name is not encoded: try each
        try:
            base = importlib.import_module(module_name)
            for part in qualname.split("."):
                base = getattr(base, part)
            return subclass(_MIXINS[mixin_name], base)
        except (ImportError, AttributeError):
            module_name, _, head = module_name.rpartition(".")
            qualname = f"{head}.{qualname}"
    raise AttributeError(name)


@register_mixin
class FusedAwayNormAct:
    """Mixed into timm's ``BatchNormAct2d`` (BN, then its own ``drop`` and ``act``) whose BN the
    preceding :class:`FusedConvBN2d` applies: then only ``act(drop(x))`` is left, or nothing when
    the conv applies the ReLU too; its own forward otherwise."""

    fused_into: FusedConvBN2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn_intact, relu = self.fused_into.fused_state()
        if not bn_intact:
            return super().forward(x)
        return x if relu else self.act(self.drop(x))


def inactive(drop: nn.Module | None) -> bool:
    """Whether a timm DropPath / DropBlock2d (or nn.Identity / None) returns its input as it is now:
    both do in eval and with a zero drop probability (their forwards, checked by ``_patterns``)."""
    return drop is None or type(drop) is nn.Identity or not drop.training or not drop.drop_prob


@register_mixin
class FusedResidualBlock(_FusedBlockMixin):
    """Mixed into a residual block whose forward is ``act_last(drop_path(se(bn_k(conv_k(...)))) +
    shortcut(x))`` with the activations between the convs (timm's ``BasicBlock`` / ``Bottleneck``
    without anti-aliasing, checked by ``_patterns.residual_block``): fused as the torchvision blocks
    are, SE and an active DropPath as the join's per-(sample, channel) gate (``_gates``: SE's pooled
    input from the deferred BN, DropPath's draws by the block's own module). While its DropBlock
    would drop something (training with a drop probability) it runs its own forward, unfused, so that
    DropBlock draws the same random numbers as unfused (a DropBlock mask is per pixel, no gate)."""

    fused_names: tuple[tuple[str, str], ...]  # (conv, bn) attribute names, in order
    fused_acts: tuple[str, ...]  # the activations' names, the last one after the add

    def _chain(self):
        return [(child(self, c), child(self, b)) for c, b in self.fused_names]

    def _act_code(self) -> int:
        # One kind for all of the block's activations (_patterns.why_not_residual checks it).
        return _activation.module_code(self._modules[self.fused_acts[0]])

    def _fused_pairs(self):
        # The block's structure as fuse checked it, checked again now (a module may have been replaced);
        # the mixin's fusable(), eval_pairs() and forward() all ask this.
        if not (_patterns.residual_block_intact(self) and inactive(getattr(self, "drop_block", None))):
            return None
        return self._chain(), downsample_pair(child(self, "downsample"))

    def _join_gate(self):
        se = self._modules.get("se")
        drop = getattr(self, "drop_path", None)
        drop = None if inactive(drop) else drop
        if se is None and drop is None:
            return None
        return lambda h: _gates.join_gate(h, se, drop)

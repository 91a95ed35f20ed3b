"""The modules a fused conv -> BN (-> activation) chain leaves in place: the BN and the activation
keep their slots in the model (names, ``state_dict`` keys, hooks) and pass their input through while
the conv before them (``modules.FusedConvBN2d``, their ``fused_into``) does their work; while it
does not (a module of the chain was replaced or given a hook), they do their own work again."""

from __future__ import annotations

import torch
from torch import nn


def fused_away_forward(module: nn.Module, own_forward, x: torch.Tensor, which: int) -> torch.Tensor:
    """``x`` as it is while the conv ``module.fused_into`` does ``module``'s work (``which``:
    0 for its BN, 1 for its activation), else ``own_forward(module, x)``: the work of the class it was."""
    into = module.fused_into
    return x if (into.bn_applied() if which == 0 else into.fused_state()[1]) else own_forward(module, x)


class FusedAwayBatchNorm2d(nn.BatchNorm2d):
    """A BN whose work the preceding :class:`FusedConvBN2d` does: it passes its input through."""

    fused_into: nn.Conv2d  # the modules.FusedConvBN2d that does the work

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_away_forward(self, nn.BatchNorm2d.forward, x, 0)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fused into the preceding conv"


class FusedAwayActivation:
    """An activation module whose work a preceding :class:`FusedConvBN2d` does: it passes its input
    through (mixed into the activation's own class, whose forward runs when the chain is broken)."""

    fused_into: nn.Conv2d  # the modules.FusedConvBN2d that does the work

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_away_forward(self, self.__dict__["class_before_fuse"].forward, x, 1)


class FusedAwayReLU(FusedAwayActivation, nn.ReLU):
    """A ReLU whose work a preceding :class:`FusedConvBN2d` does."""


class FusedAwayReLU6(FusedAwayActivation, nn.ReLU6):
    """A ReLU6 whose work a preceding :class:`FusedConvBN2d` does."""


class FusedAwayHardtanh(FusedAwayActivation, nn.Hardtanh):
    """An ``nn.Hardtanh(0, 6)`` whose work a preceding :class:`FusedConvBN2d` does."""


class FusedAwaySiLU(FusedAwayActivation, nn.SiLU):
    """A SiLU whose work a preceding :class:`FusedConvBN2d` does."""


class FusedAwayHardswish(FusedAwayActivation, nn.Hardswish):
    """A Hardswish whose work a preceding :class:`FusedConvBN2d` does."""


class FusedAwayLeakyReLU(FusedAwayActivation, nn.LeakyReLU):
    """A LeakyReLU (slope 0.01 or 0.1) whose work a preceding :class:`FusedConvBN2d` does."""


FUSED_AWAY_ACT = {nn.ReLU: FusedAwayReLU, nn.ReLU6: FusedAwayReLU6, nn.Hardtanh: FusedAwayHardtanh,
                  nn.SiLU: FusedAwaySiLU, nn.Hardswish: FusedAwayHardswish,
                  nn.LeakyReLU: FusedAwayLeakyReLU}  # by the activation's own class (_activation.module_code's)

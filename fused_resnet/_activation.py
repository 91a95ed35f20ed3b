"""The activations the fused ops apply: their codes (the ops' ``act`` / ``in_act`` argument) and
their math in PyTorch.

The one Python definition: the reference backend, the functional API and the fuser use it; the
compiled kernels share the codes with ``csrc/kernels.h`` (``act_fwd`` / ``act_bwd``) and the Triton
kernels with ``backends/triton/_act.py``. Backward passes take the derivative at the pre-activation
``z``; for ReLU and ReLU6 the output gives the same mask (``out > 0``, ``0 < out < 6``), SiLU and
Hardswish need ``z`` itself (recomputed, never saved: Hardswish's output is not monotonic in ``z``,
so it does not determine the derivative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NONE, RELU, RELU6, SILU, HARDSWISH = 0, 1, 2, 3, 4
CODES = {None: NONE, "none": NONE, "relu": RELU, "relu6": RELU6, "silu": SILU, "hardswish": HARDSWISH}
NAMES = {NONE: None, RELU: "relu", RELU6: "relu6", SILU: "silu", HARDSWISH: "hardswish"}
# The codes whose backward needs the pre-activation (the output does not give their derivative).
NEEDS_PREACTIVATION = frozenset((SILU, HARDSWISH))


def code(activation: str | int | None) -> int:
    """The code of ``activation``: ``"relu"``, ``"relu6"``, ``"silu"``, ``"hardswish"``, None /
    ``"none"``, or a code."""
    if isinstance(activation, int) and not isinstance(activation, bool) and activation in NAMES:
        return activation
    if isinstance(activation, str):
        activation = activation.lower()
    if activation not in CODES:
        raise ValueError(f"fused_resnet: unknown activation {activation!r}; expected one of 'relu', 'relu6', "
                         "'silu', 'hardswish' or None")
    return CODES[activation]


def from_flag(activation: str | int | None, relu: bool | None) -> int:
    """The code for a public function's ``activation=`` argument, or its older ``relu=`` flag when
    that is given (True: ReLU, False: none)."""
    if relu is not None:
        return RELU if relu else NONE
    return code(activation)


def check(name: str, value: int) -> None:
    """``value`` must be an activation code (the ops' argument ``name``)."""
    if isinstance(value, bool) or value not in NAMES:
        raise ValueError(f"fused_resnet: {name} must be an activation code (0 none, 1 relu, 2 relu6, 3 silu, "
                         f"4 hardswish), got {value!r}")


def apply(z: torch.Tensor, act: int, inplace: bool = False) -> torch.Tensor:
    """``act(z)``, as ``nn.ReLU`` / ``nn.ReLU6`` / ``nn.SiLU`` / ``nn.Hardswish`` compute it (in place on
    ``z`` if asked)."""
    if act == RELU:
        return torch.relu_(z) if inplace else torch.relu(z)
    if act == RELU6:
        return F.hardtanh(z, 0.0, 6.0, inplace=inplace)
    if act == SILU:
        return F.silu(z, inplace=inplace)
    if act == HARDSWISH:
        return F.hardswish(z, inplace=inplace)
    return z


def grad(g: torch.Tensor, z: torch.Tensor, act: int) -> torch.Tensor:
    """``g * act'(z)``, ``z`` the pre-activation (for ReLU / ReLU6, the output serves as well), as
    autograd computes it for those modules."""
    if act == RELU:
        return g * (z > 0)
    if act == RELU6:
        return g * ((z > 0) & (z < 6))
    if act == SILU:
        s = torch.sigmoid(z)
        return g * (s * (1 + z * (1 - s)))
    if act == HARDSWISH:
        # d/dz z * relu6(z + 3) / 6: 0 up to -3, 1 from 3 (both kinks take the outer side's slope,
        # as ATen's hardswish_backward does), z / 3 + 1/2 between.
        return g * torch.where(z <= -3, 0.0, torch.where(z < 3, z / 3 + 0.5, 1.0)).to(g.dtype)
    return g


def module_code(module) -> int | None:
    """The code of an activation module ``fuse`` can apply in a kernel: ``nn.ReLU``, ``nn.ReLU6``,
    ``nn.Hardtanh(0, 6)``, ``nn.SiLU``, ``nn.Hardswish`` (timm's ``create_act_layer`` builds these same
    classes for "relu", "relu6", "silu" / "swish", "hard_swish"), exactly those classes; None for any
    other module."""
    kind = type(module)
    if kind is nn.ReLU:
        return RELU
    if kind is nn.ReLU6 or (kind is nn.Hardtanh and module.min_val == 0 and module.max_val == 6):
        return RELU6
    if kind is nn.SiLU:
        return SILU
    if kind is nn.Hardswish:
        return HARDSWISH
    return None

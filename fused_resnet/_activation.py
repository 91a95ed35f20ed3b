"""The activations the fused ops apply: their codes (the ops' ``act`` / ``in_act`` argument) and
their math in PyTorch.

The one Python definition: the reference backend, the functional API and the fuser use it; the
compiled kernels share the codes with ``csrc/kernels.h`` (``act_fwd`` / ``act_bwd``) and the Triton
kernels with ``backends/triton/_act.py``. Backward passes take the derivative at the pre-activation
``z``; for ReLU, ReLU6 and LeakyReLU the output gives the same mask (``out > 0``, ``0 < out < 6``;
LeakyReLU's positive slope keeps the sign), SiLU and Hardswish need ``z`` itself (recomputed, never
saved: Hardswish's output is not monotonic in ``z``, so it does not determine the derivative).

Each code is one fixed function, so LeakyReLU has one code per slope the kernels apply: 0.01
(``nn.LeakyReLU``'s default, timm's ``"leaky_relu"``) and 0.1 (YOLO-style nets); any other slope
runs as its own module (:func:`why_not`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NONE, RELU, RELU6, SILU, HARDSWISH, LEAKY_RELU, LEAKY_RELU_0_1 = 0, 1, 2, 3, 4, 5, 6
CODES = {None: NONE, "none": NONE, "relu": RELU, "relu6": RELU6, "silu": SILU, "hardswish": HARDSWISH,
         "leaky_relu": LEAKY_RELU, "leaky_relu_0.1": LEAKY_RELU_0_1}
NAMES = {NONE: None, RELU: "relu", RELU6: "relu6", SILU: "silu", HARDSWISH: "hardswish", LEAKY_RELU: "leaky_relu",
         LEAKY_RELU_0_1: "leaky_relu_0.1"}
# How reports name each activation (as the modules print).
LABELS = {RELU: "ReLU", RELU6: "ReLU6", SILU: "SiLU", HARDSWISH: "Hardswish", LEAKY_RELU: "LeakyReLU(0.01)",
          LEAKY_RELU_0_1: "LeakyReLU(0.1)"}
# LeakyReLU's negative slope for each of its codes (the kernels' constants: csrc/kernels.h, _act.py).
SLOPES = {LEAKY_RELU: 0.01, LEAKY_RELU_0_1: 0.1}
# The codes whose backward needs the pre-activation (the output does not give their derivative).
NEEDS_PREACTIVATION = frozenset((SILU, HARDSWISH))
_CODE_LIST = ", ".join(f"{c} {n or 'none'}" for c, n in NAMES.items())


def code(activation: str | int | None) -> int:
    """The code of ``activation``: ``"relu"``, ``"relu6"``, ``"silu"``, ``"hardswish"``,
    ``"leaky_relu"`` (slope 0.01), ``"leaky_relu_0.1"``, None / ``"none"``, or a code."""
    if isinstance(activation, int) and not isinstance(activation, bool) and activation in NAMES:
        return activation
    if isinstance(activation, str):
        activation = activation.lower()
    if activation not in CODES:
        raise ValueError(f"fused_resnet: unknown activation {activation!r}; expected one of 'relu', 'relu6', "
                         "'silu', 'hardswish', 'leaky_relu' (slope 0.01), 'leaky_relu_0.1' or None")
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
        raise ValueError(f"fused_resnet: {name} must be an activation code ({_CODE_LIST}), got {value!r}")


def apply(z: torch.Tensor, act: int, inplace: bool = False) -> torch.Tensor:
    """``act(z)``, as ``nn.ReLU`` / ``nn.ReLU6`` / ``nn.SiLU`` / ``nn.Hardswish`` / ``nn.LeakyReLU``
    compute it (in place on ``z`` if asked)."""
    if act == RELU:
        return torch.relu_(z) if inplace else torch.relu(z)
    if act == RELU6:
        return F.hardtanh(z, 0.0, 6.0, inplace=inplace)
    if act == SILU:
        return F.silu(z, inplace=inplace)
    if act == HARDSWISH:
        return F.hardswish(z, inplace=inplace)
    if act in SLOPES:
        return F.leaky_relu(z, SLOPES[act], inplace=inplace)
    return z


def grad(g: torch.Tensor, z: torch.Tensor, act: int) -> torch.Tensor:
    """``g * act'(z)``, ``z`` the pre-activation (for ReLU / ReLU6 / LeakyReLU, the output serves as
    well), as autograd computes it for those modules."""
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
    if act in SLOPES:
        # ATen's leaky_relu_backward: z > 0 ? g : g * slope (the slope at 0 and for NaN), the product
        # in g's dtype as ATen forms it (not g * where(...): a float32 0.01 in an fp64 product).
        return torch.where(z > 0, g, g * SLOPES[act])
    return g


def module_code(module, kind: type | None = None) -> int | None:
    """The code of an activation module ``fuse`` can apply in a kernel: ``nn.ReLU``, ``nn.ReLU6``,
    ``nn.Hardtanh(0, 6)``, ``nn.SiLU``, ``nn.Hardswish``, ``nn.LeakyReLU`` with slope 0.01 or 0.1
    (timm's ``create_act_layer`` builds these same classes for "relu", "relu6", "silu" / "swish",
    "hard_swish", "leaky_relu"), exactly those classes; None for any other module. ``kind``: the class
    to judge the module as (default its own; a fused-away module's class before ``fuse``), its
    parameters (slope, bounds) read from the module as they are now."""
    kind = type(module) if kind is None else kind
    if kind is nn.ReLU:
        return RELU
    if kind in (nn.ReLU6, nn.Hardtanh) and module.min_val == 0 and module.max_val == 6:  # ReLU6's bounds are settable too
        return RELU6
    if kind is nn.SiLU:
        return SILU
    if kind is nn.Hardswish:
        return HARDSWISH
    if kind is nn.LeakyReLU:
        return next((c for c, s in SLOPES.items() if module.negative_slope == s), None)
    return None


def why_not(module) -> str | None:
    """Why the activation module ``module`` after a fused BN runs as its own module, where the kernels
    apply its function with another parameter (a LeakyReLU of another slope); None otherwise."""
    if type(module) is nn.LeakyReLU and module_code(module) is None:
        return f"its LeakyReLU(negative_slope={module.negative_slope}) runs as its own module: the kernels " \
            "apply the slopes 0.01 and 0.1 only"
    return None

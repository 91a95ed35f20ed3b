"""The activations of the ops' ``act`` / ``in_act`` codes (``fused_resnet/_activation.py``) as Triton
functions: the one Triton definition, called with the code as a constexpr (``ACT``) by every kernel
(elementwise passes, the implicit-GEMM conv's prologue and epilogue, their backward), so each
specialisation holds only its own activation. fp32 in and out; NaN propagates as in PyTorch."""

from __future__ import annotations

import triton
import triton.language as tl

from ... import _activation

NONE = tl.constexpr(_activation.NONE)
RELU = tl.constexpr(_activation.RELU)
RELU6 = tl.constexpr(_activation.RELU6)
SILU = tl.constexpr(_activation.SILU)
HARDSWISH = tl.constexpr(_activation.HARDSWISH)
LEAKY_RELU = tl.constexpr(_activation.LEAKY_RELU)
LEAKY_RELU_0_1 = tl.constexpr(_activation.LEAKY_RELU_0_1)


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    """``act(z)``: ReLU, ReLU6 (``hardtanh(z, 0, 6)``), SiLU (``z * sigmoid(z)``), Hardswish
    (``z * relu6(z + 3) / 6``), LeakyReLU with slope 0.01 or 0.1 (``z > 0 ? z : z * slope``, as ATen),
    or ``z``."""
    if ACT == RELU:
        z = tl.where(z < 0.0, 0.0, z)  # not maximum(): a NaN stays NaN, as torch.relu keeps it
    elif ACT == RELU6:
        z = tl.where(z < 0.0, 0.0, tl.where(z > 6.0, 6.0, z))
    elif ACT == SILU:
        z = z / (1.0 + tl.exp(-z))
    elif ACT == HARDSWISH:
        t = z + 3.0
        z = z * tl.where(t < 0.0, 0.0, tl.where(t > 6.0, 6.0, t)) / 6.0
    elif ACT == LEAKY_RELU:
        z = tl.where(z > 0.0, z, z * 0.01)
    elif ACT == LEAKY_RELU_0_1:
        z = tl.where(z > 0.0, z, z * 0.1)
    return z


@triton.jit
def act_bwd(g, z, ACT: tl.constexpr):
    """``g * act'(z)``, ``z`` the pre-activation (ReLU / ReLU6: the output gives the same mask). Masks
    are products, not selects: a NaN gradient propagates."""
    if ACT == RELU:
        g = g * (z > 0.0).to(tl.float32)
    elif ACT == RELU6:
        g = g * ((z > 0.0) & (z < 6.0)).to(tl.float32)
    elif ACT == SILU:
        s = 1.0 / (1.0 + tl.exp(-z))
        g = g * (s * (1.0 + z * (1.0 - s)))
    elif ACT == HARDSWISH:  # the kinks take the outer slopes, as ATen's hardswish_backward
        g = g * tl.where(z <= -3.0, 0.0, tl.where(z < 3.0, z / 3.0 + 0.5, 1.0))
    elif ACT == LEAKY_RELU:  # the slope at 0 and for NaN, as ATen's leaky_relu_backward
        g = tl.where(z > 0.0, g, g * 0.01)
    elif ACT == LEAKY_RELU_0_1:
        g = tl.where(z > 0.0, g, g * 0.1)
    return g

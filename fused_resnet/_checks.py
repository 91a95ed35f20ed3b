"""Argument checks shared by the ops' real and fake implementations: bad input gets a clear error
(the same exception classes as ``nn.Conv2d`` / ``nn.BatchNorm2d``) before any kernel runs."""

from __future__ import annotations

import torch

from ._layout import ACTIVATION_DTYPES, stat_dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_activation(name: str, t: torch.Tensor) -> None:
    if t.dim() != 4:
        raise RuntimeError(f"fused_resnet: expected 4-D (N, C, H, W) {name}, got shape {tuple(t.shape)}")
    if t.dtype not in ACTIVATION_DTYPES:
        raise TypeError(
            f"fused_resnet: {name} has dtype {_dtype_name(t.dtype)}; supported: float16, bfloat16, float32, float64"
        )


def check_same(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    """``t`` must match ``like`` in dtype and device (the message nn.Conv2d users know)."""
    if t.device != like.device:
        raise RuntimeError(
            f"fused_resnet: {name} is on {t.device} but {like_name} is on {like.device}; move them to one device"
        )
    if t.dtype != like.dtype:
        raise RuntimeError(
            f"fused_resnet: {like_name} type ({_dtype_name(like.dtype)}) and {name} type "
            f"({_dtype_name(t.dtype)}) should be the same"
        )


def check_per_channel(name: str, t: torch.Tensor | None, channels: int, activation: torch.Tensor) -> None:
    """A per-channel vector: shape ``[channels]``, the statistics dtype, the activation's device."""
    if t is None:
        return
    expected = stat_dtype(activation.dtype)
    if t.dim() != 1 or t.shape[0] != channels:
        raise RuntimeError(f"fused_resnet: {name} must have shape ({channels},), got {tuple(t.shape)}")
    if t.dtype != expected or t.device != activation.device:
        raise RuntimeError(
            f"fused_resnet: {name} must be {_dtype_name(expected)} on {activation.device} for "
            f"{_dtype_name(activation.dtype)} activations, got {_dtype_name(t.dtype)} on {t.device}"
        )


def check_gate(gate: torch.Tensor | None, activation: torch.Tensor) -> None:
    """``bn_add_relu``'s gate: shape (N, C) or (N, C, 1, 1), the activation's dtype or its statistics
    dtype, on its device."""
    if gate is None:
        return
    n, c = activation.shape[:2]
    if tuple(gate.shape) not in ((n, c), (n, c, 1, 1)):
        raise RuntimeError(
            f"fused_resnet: gate must have shape ({n}, {c}) or ({n}, {c}, 1, 1) (per sample and channel), "
            f"got {tuple(gate.shape)}"
        )
    if gate.device != activation.device:
        raise RuntimeError(f"fused_resnet: gate is on {gate.device} but input is on {activation.device}")
    allowed = (activation.dtype, stat_dtype(activation.dtype))
    if gate.dtype not in allowed:
        raise RuntimeError(
            f"fused_resnet: gate must be {_dtype_name(allowed[0])} or {_dtype_name(allowed[1])} for "
            f"{_dtype_name(activation.dtype)} activations, got {_dtype_name(gate.dtype)}"
        )


def check_conv(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> None:
    check_activation("input", x)
    check_same("weight", weight, x, "input")
    if weight.dim() != 4:
        raise RuntimeError(f"fused_resnet: expected 4-D conv weight, got shape {tuple(weight.shape)}")
    if groups < 1 or x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise RuntimeError(
            f"fused_resnet: conv weight of shape {tuple(weight.shape)} with groups={groups} expects "
            f"{weight.shape[1] * groups} input channels, but got input of shape {tuple(x.shape)}"
        )
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise RuntimeError(f"fused_resnet: invalid conv stride {stride}, padding {padding} or dilation {dilation}")
    for d in (2, 3):
        k = dilation[d - 2] * (weight.shape[d] - 1) + 1
        if x.shape[d] + 2 * padding[d - 2] < k:
            raise RuntimeError(
                f"fused_resnet: input of shape {tuple(x.shape)} is smaller than the (dilated) kernel {k} "
                f"after padding {padding}"
            )


def check_residual(residual: torch.Tensor | None, like: torch.Tensor, shape) -> None:
    """The residual must have the main branch's ``shape``, and ``like``'s dtype and device."""
    if residual is None:
        return
    check_same("residual", residual, like, "main branch")
    if list(residual.shape) != list(shape):
        raise RuntimeError(
            f"fused_resnet: residual of shape {tuple(residual.shape)} does not match the main branch "
            f"{tuple(shape)}; a downsample module is needed when stride or channels change"
        )


def check_batch_statistics(x_shape, training: bool) -> None:
    """``nn.BatchNorm2d``'s rule: batch statistics need more than one value per channel."""
    values = x_shape[0] * x_shape[2] * x_shape[3]
    if training and values == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {list(x_shape)}"
        )

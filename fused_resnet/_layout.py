"""Layout and dtype conventions shared by every op, its fake and every backend kernel.

One rule for all: an op's activation outputs are channels_last exactly when its main input is
channels_last (and not also NCHW-contiguous, as happens for ``H == W == 1``); per-channel
statistics and BN scale/shift are fp32, or fp64 for fp64 activations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of an op's activation outputs, given its main 4-D input ``x``."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of per-channel statistics and BN scale/shift for activations of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv_output_size(
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> list[int]:
    """Shape ``[N, C_out, H_out, W_out]`` of a 2-D convolution (same formula as ``nn.Conv2d``)."""
    n, _, h, w = x_shape
    c_out, _, kh, kw = weight_shape
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return [n, c_out, h_out, w_out]


def empty_activation(x: torch.Tensor, shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised activation of ``shape`` laid out as the op rule says for input ``x``."""
    return torch.empty(
        shape, dtype=dtype or x.dtype, device=x.device, memory_format=output_memory_format(x)
    )


def channel_view(v: torch.Tensor) -> torch.Tensor:
    """A per-channel vector ``[C]`` viewed as ``[1, C, 1, 1]`` for broadcasting over NCHW."""
    return v.view(1, -1, 1, 1)

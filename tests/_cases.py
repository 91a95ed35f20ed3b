"""Shapes and input makers shared by the op tests (every backend's tests may use them)."""

from __future__ import annotations

import torch

from fused_resnet._layout import stat_dtype

# (N, C_in, H, W, C_out, kernel, stride, padding): stride 1/2, odd sizes, odd channel counts, 7x7 stem.
CONV_SHAPES = [
    (2, 3, 9, 7, 5, 3, 1, 1),
    (3, 8, 10, 11, 6, 3, 2, 1),
    (2, 5, 7, 7, 12, 1, 1, 0),
    (2, 6, 9, 9, 4, 1, 2, 0),
    (2, 3, 15, 13, 7, 7, 2, 3),
]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def activation(shape, dtype=torch.float32, layout="nchw", device="cpu", offset=0.0) -> torch.Tensor:
    return (torch.randn(shape, dtype=dtype, device=device) + offset).to(memory_format=LAYOUTS[layout])


def per_channel(c, dtype, device="cpu", positive=False) -> torch.Tensor:
    v = torch.randn(c, dtype=stat_dtype(dtype), device=device)
    return v.abs() + 0.5 if positive else v


def conv_case(shape, dtype=torch.float32, layout="nchw", device="cpu", prologue=True):
    """Arguments of the ``conv_stats`` kernel for one entry of ``CONV_SHAPES``."""
    n, cin, h, w, cout, k, s, p = shape
    x = activation((n, cin, h, w), dtype, layout, device)
    weight = torch.randn(cout, cin, k, k, dtype=dtype, device=device) / (cin * k * k) ** 0.5
    scale = per_channel(cin, dtype, device, positive=True) if prologue else None
    shift = per_channel(cin, dtype, device) if prologue else None
    return x, scale, shift, prologue, weight, [s, s], [p, p], [1, 1], 1

"""ATen's convolution backward as the kernels of every backend call it, with one workaround.

ATen's CPU convolution backward (oneDNN) corrupts memory (SIGSEGV, abort) for some 1x1 strided
convolutions of channels_last inputs (torch 2.13 and 2.14; e.g. a 3x8x10x10 input, 4 output
channels, stride 2: eager ``conv2d``'s backward crashes there too). With NCHW operands it is right,
so such a backward runs in NCHW (a copy of the input and the incoming gradient: these are the
downsample convs, a few per network). The native kernels run the common case (unpadded, ungrouped)
as two matrix products on every s-th pixel instead, without the layout copies (``csrc/fused_ops.cpp``).
"""

from __future__ import annotations

import torch

_aten = torch.ops.aten


def convolution_backward(grad, x, weight, stride, padding, dilation, groups: int, need_x: bool, need_weight: bool):
    """``(grad_x, grad_weight)`` of ``conv2d(x, weight)`` for ``grad`` (None where not asked for;
    in the layout ATen picks: callers put them in theirs)."""
    if x.device.type == "cpu" and weight.shape[2:] == (1, 1) and max(stride) > 1 and not x.is_contiguous():
        grad, x, weight = grad.contiguous(), x.contiguous(), weight.contiguous()
    grad_x, grad_w, _ = _aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False, [0, 0],
                                                   groups, [need_x, need_weight, False])
    return grad_x, grad_w

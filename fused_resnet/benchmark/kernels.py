"""Kernel-level cases for the roofline report: each fused op of a block, called directly through
``torch.ops.fused_resnet`` with the block's 3x3 conv shape (the stage's stride), with its FLOPs and
the fewest bytes it could move (every input read once, every output written once).

The floor time of a kernel is ``max(flops / matmul peak, bytes / copy bandwidth)`` with both roofs
measured on the device (:func:`.timing.measure_peaks`); the report prints floor / measured time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops  # noqa: F401  (registers the ops)
from .._backend import use_backend
from .._library import NAMESPACE
from .cases import BLOCKS, BlockShape, Prepared, Sizes

KERNELS = ("conv_stats", "conv_stats_backward", "conv_bias_act", "bn_add_relu", "bn_add_relu_backward")
_ops = getattr(torch.ops, NAMESPACE)


@dataclass(frozen=True)
class KernelCost:
    flops: float
    bytes: float


def _conv_geometry(shape: BlockShape, sizes: Sizes):
    """(N, C_in, H, C_out, H_out, stride) of the block's 3x3 conv (``conv1`` of a BasicBlock,
    ``conv2`` of a Bottleneck: where the stage's stride is)."""
    h = sizes.block_size(shape)
    c_in = shape.inplanes if shape.kind == "basic" else shape.planes
    c_out = shape.planes
    h_out = -(-h // shape.stride)
    return sizes.batch, c_in, h, c_out, h_out, shape.stride


def cost(kernel: str, shape: BlockShape, sizes: Sizes) -> KernelCost:
    n, c_in, h, c_out, h_out, _ = _conv_geometry(shape, sizes)
    e = torch.empty((), dtype=sizes.dtype).element_size()
    x, y, w = n * c_in * h * h * e, n * c_out * h_out * h_out * e, c_out * c_in * 9 * e
    conv_flops = 2.0 * n * h_out * h_out * c_out * c_in * 9
    if kernel == "conv_stats":  # read x (prologue applied on load), w; write y (stats are per channel)
        return KernelCost(conv_flops, x + w + y)
    if kernel == "conv_stats_backward":  # dgrad + wgrad; read grad_y, y, x, w; write grad_x, grad_w
        return KernelCost(2 * conv_flops, 2 * y + 2 * x + 2 * w)
    if kernel == "conv_bias_act":  # stride-1 conv c_out -> c_out at h_out, + residual: read x, w, res; write out
        flops = 2.0 * n * h_out * h_out * c_out * c_out * 9
        return KernelCost(flops, 3 * y + c_out * c_out * 9 * e)
    if kernel == "bn_add_relu":  # read y and residual, write out
        return KernelCost(4.0 * y / e, 3 * y)
    if kernel == "bn_add_relu_backward":  # read grad_out, y, residual; write grad_y, grad_residual
        return KernelCost(6.0 * y / e, 5 * y)
    raise ValueError(f"unknown kernel {kernel!r}")


def prepare_kernel(kernel: str, shape: BlockShape, backend: str, sizes: Sizes, device: torch.device) -> Prepared:
    n, c_in, h, c_out, h_out, s = _conv_geometry(shape, sizes)
    g = torch.Generator().manual_seed(3)
    cl = torch.channels_last

    def act(c, size):
        return torch.randn(n, c, size, size, generator=g).to(device, sizes.dtype).contiguous(memory_format=cl)

    def per_channel(c, lo=-0.5, hi=0.5):
        return torch.empty(c).uniform_(lo, hi, generator=g).to(device)

    conv = ([s, s], [1, 1], [1, 1], 1)
    if kernel in ("conv_stats", "conv_stats_backward"):
        x, w = act(c_in, h), (torch.randn(c_out, c_in, 3, 3, generator=g) * 0.1).to(device, sizes.dtype)
        w = w.contiguous(memory_format=cl)
        scale, shift = per_channel(c_in, 0.5, 1.5), per_channel(c_in)
        if kernel == "conv_stats":
            def fn():
                with use_backend(backend):
                    return _ops.conv_stats(x, scale, shift, 1, w, *conv)
        else:
            with use_backend(backend):
                y, mean, _ = _ops.conv_stats(x, scale, shift, 1, w, *conv)
            gy, gm, gv = act(c_out, h_out), per_channel(c_out), per_channel(c_out)

            def fn():
                with use_backend(backend):
                    return _ops.conv_stats_backward(gy, gm, gv, x, scale, shift, 1, w, y, mean, *conv,
                                                    [True, True, True])
    elif kernel == "conv_bias_act":
        x, res = act(c_out, h_out), act(c_out, h_out)
        w = (torch.randn(c_out, c_out, 3, 3, generator=g) * 0.1).to(device, sizes.dtype).contiguous(memory_format=cl)
        bias = per_channel(c_out)

        def fn():
            with use_backend(backend):
                return _ops.conv_bias_act(x, w, bias, res, [1, 1], [1, 1], [1, 1], 1, 1)
    else:
        y, res = act(c_out, h_out), act(c_out, h_out)
        scale, shift = per_channel(c_out, 0.5, 1.5), per_channel(c_out)
        rs, rsh = (per_channel(c_out, 0.5, 1.5), per_channel(c_out)) if shape.downsample else (None, None)
        if kernel == "bn_add_relu":
            def fn():
                with use_backend(backend):
                    return _ops.bn_add_relu(y, scale, shift, res, rs, rsh, 1)
        else:
            go = act(c_out, h_out)

            def fn():
                with use_backend(backend):
                    return _ops.bn_add_relu_backward(go, y, scale, shift, res, rs, rsh, 1, [True] * 4)
    return Prepared(fn, n)


def kernel_shapes() -> tuple[BlockShape, ...]:
    return BLOCKS

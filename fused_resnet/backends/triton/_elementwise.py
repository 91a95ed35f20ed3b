"""``act(y * scale + shift + residual * res_scale + res_shift)`` and its backward, one pass each.

One forward kernel serves three ops, each term optional (constexpr flags, no dummy arithmetic):
the block tail ``bn_add_relu`` (bn2 + identity or bn_ds shortcut + activation), a conv prologue
``act(x * in_scale + in_shift)`` (the transient input of a cuDNN conv) and the epilogue of
``conv_bias_act`` (``act(conv + bias + residual)``); ``act`` one of ``_act``'s codes. One backward
kernel serves their gradients: the pre-activation is recomputed from the inputs (or read as given:
pass the saved output, for ReLU/ReLU6, or the pre-activation as ``y`` with no scale/shift),
``dz = g * act'(z)``, and in the same pass it writes
``dz * scale`` and ``dz * res_scale`` and reduces ``sum(dz)``, ``sum(dz * y)``,
``sum(dz * residual)`` per channel (partials per row chunk, summed once; no atomics).

Arithmetic in fp32 on any activation dtype; every tensor carries its own strides (see
``_tiling``), so NCHW and channels_last mix freely and no hidden copies are made.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._layout import empty_activation
from ._act import NONE, act_bwd, act_fwd
from ._tiling import (
    INTERPRETER_TILE,
    channels_inner,
    device_function,
    per_channel,
    row_chunks,
    rows_of,
    strides,
    sum_rows,
    tile_configs,
    tile_mask,
    tile_offsets,
    tuned,
)

_TILES = [(64, 64), (128, 32), (32, 128), (256, 16), (128, 64)]


@device_function
def _channel_vector(ptr, c, c_valid, CL: tl.constexpr):
    return per_channel(tl.load(ptr + c, mask=c_valid, other=0.0).to(tl.float32), CL)


@device_function
def _preactivation(y, res, scale_ptr, shift_ptr, rscale_ptr, rshift_ptr, c, c_valid,
                   HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
                   HAS_RSCALE: tl.constexpr, HAS_RSHIFT: tl.constexpr, CL: tl.constexpr):
    """``y * scale + shift + (res * res_scale + res_shift)`` in fp32, in the reference's order."""
    z = y
    if HAS_SCALE:
        z = z * _channel_vector(scale_ptr, c, c_valid, CL)
    if HAS_SHIFT:
        z = z + _channel_vector(shift_ptr, c, c_valid, CL)
    if HAS_RES:
        r = res
        if HAS_RSCALE:
            r = r * _channel_vector(rscale_ptr, c, c_valid, CL)
        if HAS_RSHIFT:
            r = r + _channel_vector(rshift_ptr, c, c_valid, CL)
        z = z + r
    return z


@tuned(tile_configs(_TILES), key=["M", "C", "HW", "CL"], interpreter=INTERPRETER_TILE)
@triton.jit
def _bn_add_relu_fwd_kernel(
    y_ptr, scale_ptr, shift_ptr,  # y [N, C, H, W]; scale/shift [C] fp32
    res_ptr, rscale_ptr, rshift_ptr,  # residual [N, C, H, W]; its scale/shift [C] fp32
    out_ptr,  # [N, C, H, W] out, any float dtype
    M, C, HW,
    y_sn, y_sc, y_shw, r_sn, r_sc, r_shw, o_sn, o_sc, o_shw,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr, HAS_RSCALE: tl.constexpr,
    HAS_RSHIFT: tl.constexpr, ACT: tl.constexpr, CL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``out = act(y * scale + shift + res * res_scale + res_shift)``: one read of ``y`` (and of
    ``res``), one write of ``out``: ``(2 or 3) * M * C * elem`` bytes, ~5 FLOPs per element.
    Eager PyTorch takes up to 5 passes over the activations (two BN applications, add, activation),
    each a read and a write: up to ``11 * M * C * elem`` bytes for the block tail."""
    n, hw, row_valid = rows_of(tl.program_id(0).to(tl.int64) * BLOCK_M, M, HW, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = c < C
    mask = tile_mask(row_valid, c_valid, CL)
    y = tl.load(y_ptr + tile_offsets(n, hw, c, y_sn, y_sc, y_shw, CL), mask=mask, other=0.0).to(tl.float32)
    res = y
    if HAS_RES:
        res = tl.load(res_ptr + tile_offsets(n, hw, c, r_sn, r_sc, r_shw, CL), mask=mask, other=0.0).to(tl.float32)
    z = _preactivation(y, res, scale_ptr, shift_ptr, rscale_ptr, rshift_ptr, c, c_valid,
                       HAS_SCALE, HAS_SHIFT, HAS_RES, HAS_RSCALE, HAS_RSHIFT, CL)
    z = act_fwd(z, ACT)
    tl.store(out_ptr + tile_offsets(n, hw, c, o_sn, o_sc, o_shw, CL), z.to(out_ptr.dtype.element_ty), mask=mask)


@tuned(tile_configs(_TILES), key=["M", "C", "HW", "ROWS", "CL"], interpreter=INTERPRETER_TILE)
@triton.jit
def _bn_add_relu_bwd_kernel(
    dout_ptr, y_ptr, scale_ptr, shift_ptr,  # grad_out, y [N, C, H, W]; scale/shift [C] fp32
    res_ptr, rscale_ptr, rshift_ptr,  # residual [N, C, H, W]; its scale/shift [C] fp32
    dy_ptr, dres_ptr,  # out [N, C, H, W]: dz * scale, dz * res_scale
    sum_dz_ptr, sum_dzy_ptr, sum_dzr_ptr,  # out [T, C] fp32 partials of sum(dz), sum(dz*y), sum(dz*res)
    M, C, HW, ROWS,
    g_sn, g_sc, g_shw, y_sn, y_sc, y_shw, r_sn, r_sc, r_shw, dy_sn, dy_sc, dy_shw, dr_sn, dr_sc, dr_shw,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr, HAS_RSCALE: tl.constexpr,
    HAS_RSHIFT: tl.constexpr, ACT: tl.constexpr, WRITE_DY: tl.constexpr, WRITE_DRES: tl.constexpr,
    SUM_DZ: tl.constexpr, SUM_DZY: tl.constexpr, SUM_DZR: tl.constexpr, CL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Chunk ``t`` of rows x a channel block: ``dz = grad_out * act'(z)`` with ``z`` recomputed,
    then every output above in the same pass. One read of ``grad_out``, ``y`` (and ``res`` when
    the mask or ``sum(dz*res)`` needs it), one write of each gradient asked for: at most
    ``5 * M * C * elem`` bytes plus ``3 * T * C`` fp32 partials; ~12 FLOPs per element. Eager
    PyTorch needs separate passes for the mask, each product and each reduction (5 to 9 of
    them, ~2 activation-sized reads or writes each)."""
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = c < C
    start = t * ROWS
    end = tl.minimum(start + ROWS, M)
    acc_dz = tl.full([BLOCK_C], 0.0, tl.float32)
    acc_dzy = tl.full([BLOCK_C], 0.0, tl.float32)
    acc_dzr = tl.full([BLOCK_C], 0.0, tl.float32)
    for row0 in range(start, end, BLOCK_M):
        n, hw, row_valid = rows_of(row0, end, HW, BLOCK_M)
        mask = tile_mask(row_valid, c_valid, CL)
        dz = tl.load(dout_ptr + tile_offsets(n, hw, c, g_sn, g_sc, g_shw, CL), mask=mask, other=0.0).to(tl.float32)
        if ACT != NONE or SUM_DZY:
            y = tl.load(y_ptr + tile_offsets(n, hw, c, y_sn, y_sc, y_shw, CL), mask=mask, other=0.0).to(tl.float32)
        else:
            y = dz
        res = y
        if HAS_RES and (ACT != NONE or SUM_DZR):
            res = tl.load(res_ptr + tile_offsets(n, hw, c, r_sn, r_sc, r_shw, CL), mask=mask, other=0.0)
            res = res.to(tl.float32)
        if ACT != NONE:
            z = _preactivation(y, res, scale_ptr, shift_ptr, rscale_ptr, rshift_ptr, c, c_valid,
                               HAS_SCALE, HAS_SHIFT, HAS_RES, HAS_RSCALE, HAS_RSHIFT, CL)
            dz = act_bwd(dz, z, ACT)
        if WRITE_DY:
            dy = dz
            if HAS_SCALE:
                dy = dy * _channel_vector(scale_ptr, c, c_valid, CL)
            off = tile_offsets(n, hw, c, dy_sn, dy_sc, dy_shw, CL)
            tl.store(dy_ptr + off, dy.to(dy_ptr.dtype.element_ty), mask=mask)
        if WRITE_DRES:
            dr = dz
            if HAS_RSCALE:
                dr = dr * _channel_vector(rscale_ptr, c, c_valid, CL)
            off = tile_offsets(n, hw, c, dr_sn, dr_sc, dr_shw, CL)
            tl.store(dres_ptr + off, dr.to(dres_ptr.dtype.element_ty), mask=mask)
        if SUM_DZ:
            acc_dz += sum_rows(dz, CL)
        if SUM_DZY:
            acc_dzy += sum_rows(dz * y, CL)
        if SUM_DZR:
            acc_dzr += sum_rows(dz * res, CL)
    out = t * C + c
    if SUM_DZ:
        tl.store(sum_dz_ptr + out, acc_dz, mask=c_valid)
    if SUM_DZY:
        tl.store(sum_dzy_ptr + out, acc_dzy, mask=c_valid)
    if SUM_DZR:
        tl.store(sum_dzr_ptr + out, acc_dzr, mask=c_valid)


def _vec(v: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # Per-channel vectors are tiny: a contiguous copy of a strided one costs nothing.
    return like if v is None else v.contiguous()


def bn_add_relu(y, scale, shift, residual, res_scale, res_shift, act, out_dtype=None, out=None):
    """``act(y * scale + shift + residual * res_scale + res_shift)`` into ``out`` (default: a new
    tensor in ``y``'s layout and ``out_dtype``, default ``y``'s). ``y``/``residual``: mergeable
    activations (see ``_tiling``); scale/shift terms fp32 ``[C]`` or None."""
    n, c, h, w = y.shape
    if out is None:
        out = empty_activation(y, y.shape, out_dtype)
    res = residual if residual is not None else y
    _bn_add_relu_fwd_kernel[lambda meta: (triton.cdiv(n * h * w, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]))](
        y, _vec(scale, y), _vec(shift, y), res, _vec(res_scale, y), _vec(res_shift, y), out,
        n * h * w, c, h * w, *strides(y), *strides(res), *strides(out),
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_RES=residual is not None,
        HAS_RSCALE=res_scale is not None, HAS_RSHIFT=res_shift is not None, ACT=int(act),
        CL=channels_inner(out),
    )
    return out


def bn_add_relu_backward(grad_out, y, scale, shift, residual, res_scale, res_shift, act, *,
                         dy_dtype=None, need_dy=True, need_dres=False, sum_dz=False, sum_dzy=False, sum_dzr=False):
    """One pass: ``dz = grad_out * act'(z)`` (``z`` the forward pre-activation, recomputed), then
    ``(dz * scale, dz * res_scale, sum(dz), sum(dz * y), sum(dz * residual))``, each only when
    asked for (else None). ``dz * scale`` is in ``dy_dtype`` (default ``y``'s) and ``y``'s
    layout, ``dz * res_scale`` in the residual's; sums are fp32 ``[C]``."""
    n, c, h, w = y.shape
    m = n * h * w
    t, rows = row_chunks(m, c, y.device)
    res = residual if residual is not None else y
    dy = empty_activation(y, y.shape, dy_dtype) if need_dy else None
    dres = empty_activation(residual, residual.shape) if need_dres else None
    wanted = (sum_dz, sum_dzy, sum_dzr and residual is not None)
    partials = [torch.empty((t, c), dtype=torch.float32, device=y.device) if on else None for on in wanted]
    dummy = next((p for p in partials if p is not None), y)
    _bn_add_relu_bwd_kernel[lambda meta: (t, triton.cdiv(c, meta["BLOCK_C"]))](
        grad_out, y, _vec(scale, y), _vec(shift, y), res, _vec(res_scale, y), _vec(res_shift, y),
        dy if dy is not None else y, dres if dres is not None else y,
        *(p if p is not None else dummy for p in partials),
        m, c, h * w, rows,
        *strides(grad_out), *strides(y), *strides(res), *strides(dy if dy is not None else y),
        *strides(dres if dres is not None else y),
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_RES=residual is not None,
        HAS_RSCALE=res_scale is not None, HAS_RSHIFT=res_shift is not None, ACT=int(act),
        WRITE_DY=dy is not None, WRITE_DRES=dres is not None,
        SUM_DZ=wanted[0], SUM_DZY=wanted[1], SUM_DZR=wanted[2], CL=channels_inner(y),
    )
    # Second level of the reductions: [T, C] -> [C], a fixed-order sum over a few rows.
    sums = [p.sum(0) if p is not None else None for p in partials]
    return dy, dres, *sums

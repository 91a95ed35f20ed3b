"""Implicit-GEMM 2-D convolution in Triton: the weight gradient (see ``_conv_gemm_backward`` for the math).

``grad_w[k, c, r, s] = sum_{n, ho, wo} g[n, k, ho, wo] * a[n, c, ho * st - p + r, wo * st - p + s]`` is a
GEMM ``C_out x C_in`` per tap whose reduction runs over the output pixels; ``g`` comes from
``load_grad`` and ``a = act(x * scale + shift)`` from ``load_activation``: neither is materialised.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._conv_gemm_common import (
    dot_precision,
    flat_k,
    grad_sources,
    interpreting,
    launch,
    load_activation,
    load_grad,
    make_config,
    nchw_strides,
    prune_by_shared_memory,
)

# wgrad: BLOCK_M over C_out, BLOCK_N over C_in, BLOCK_K over pixels.
GPU_WGRAD_CONFIGS = [
    make_config(128, 128, 64, 8, 3),
    make_config(128, 64, 64, 4, 4),
    make_config(64, 128, 64, 4, 4),
    make_config(64, 64, 64, 4, 3),
    make_config(64, 64, 32, 4, 4),
]
INTERPRETER_WGRAD_CONFIG = make_config(64, 64, 32, 4, 1)
# Pixels per split: a multiple of every BLOCK_K, so that programs run whole tiles (the loop masks the end).
_GPU_SPLIT_ALIGN = 256
_INTERPRETER_SPLIT_ALIGN = 32


@triton.jit
def _conv_gemm_wgrad_kernel(
    gy_ptr, y_ptr, mean_ptr, gmean_ptr, gvar_ptr,  # as in the dgrad kernel
    x_ptr, scale_ptr, shift_ptr,  # [N, C_in, H, W] any strides and [C_in] fp32: the forward prologue
    dw_ptr,  # [SPLIT, C_out, C_in, KH, KW] (strides sws, swo, swi, swh, sww): fp32 partials or grad_w
    db_ptr,  # [SPLIT, C_out] fp32 partial bias gradient (BIAS_GRAD)
    inv_count, M, C_in, H, W, C_out, H_out, W_out, rows_per_split,
    sgn, sgc, sgh, sgw, syn, syc, syh, syw, sxn, sxc, sxh, sxw, sws, swo, swi, swh, sww,
    stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr, FLAT_N: tl.constexpr, G_MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_ACT: tl.constexpr, BIAS_GRAD: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Weight gradient ``g^T @ im2col(a)`` for one ``BLOCK_M`` (C_out) x ``BLOCK_N`` (C_in) tile of one tap
    (or of ``(tap, channel)`` pairs, ``FLAT_N``), over one split of the pixels. FLOPs: ``2 * M * C_out * KH * KW * C_in``. Bytes: ``g``'s sources read
    ``KH * KW * ceil(C_in / BLOCK_N)`` times and ``x`` ``ceil(C_out / BLOCK_M)`` times (mostly L2),
    partials ``4 * SPLIT * |w|``. Saved versus eager: neither ``g`` (``2 * |y|``) nor the activation
    ``act(x * scale + shift)`` (``2 * |x|``) is written and read back; the bias gradient costs no pass.
    """
    pid = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    if FLAT_N:
        # Few input channels (the stem's 3): the N index is a (tap, channel) pair (grid axis 1 is 1),
        # so a tile is not 95% padding.
        num_n = tl.cdiv(KH * KW * C_in, BLOCK_N)
    else:
        num_n = tl.cdiv(C_in, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = offs_co < C_out
    co64 = offs_co.to(tl.int64)[:, None]
    if FLAT_N:
        ci_ok = offs_n < KH * KW * C_in
        col_tap = offs_n // C_in
        chan = offs_n - col_tap * C_in
        r = (col_tap // KW)[None, :]
        s = (col_tap % KW)[None, :]
    else:
        ci_ok = offs_n < C_in
        chan = offs_n
        r = tap // KW
        s = tap % KW
    ci64 = chan.to(tl.int64)[None, :]
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g_total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_K):
        offs_m = m0 + tl.arange(0, BLOCK_K)
        m_ok = offs_m < m_end
        img = offs_m // (H_out * W_out)
        pix = offs_m % (H_out * W_out)
        ho = pix // W_out
        wo = pix % W_out
        g_cols = img.to(tl.int64) * sgn + ho.to(tl.int64) * sgh + wo.to(tl.int64) * sgw
        y_cols = img.to(tl.int64) * syn + ho.to(tl.int64) * syh + wo.to(tl.int64) * syw
        g = load_grad(gy_ptr, co64 * sgc + g_cols[None, :], y_ptr, co64 * syc + y_cols[None, :],
                      co_ok[:, None] & m_ok[None, :], offs_co[:, None], co_ok[:, None],
                      mean_ptr, gmean_ptr, gvar_ptr, inv_count, G_MODE)
        # [BLOCK_K, 1] per tap, or [BLOCK_K, BLOCK_N] when columns are (tap, channel) pairs.
        h = (ho * stride_h - pad_h)[:, None] + r
        w = (wo * stride_w - pad_w)[:, None] + s
        in_ok = m_ok[:, None] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        x_offs = img.to(tl.int64)[:, None] * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw + ci64 * sxc
        a = load_activation(x_ptr, x_offs, in_ok & ci_ok[None, :], chan[None, :], ci_ok[None, :],
                            scale_ptr, shift_ptr, HAS_SCALE, HAS_SHIFT, IN_ACT)
        acc = tl.dot(g.to(x_ptr.dtype.element_ty), a.to(x_ptr.dtype.element_ty), acc, input_precision=PRECISION)
        if BIAS_GRAD:
            g_total += tl.sum(g.to(tl.float32), axis=1)

    dw = dw_ptr + split.to(tl.int64) * sws + co64 * swo + ci64 * swi + r * swh + s * sww
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=co_ok[:, None] & ci_ok[None, :])
    if BIAS_GRAD:  # noqa: SIM102 (a constexpr test, then a runtime one: Triton wants them apart)
        if (pid_n == 0) & (tap == 0):
            tl.store(db_ptr + split.to(tl.int64) * C_out + offs_co, g_total, mask=co_ok)


_wgrad_tuned = triton.autotune(
    configs=GPU_WGRAD_CONFIGS, key=["M", "C_in", "C_out", "H", "W", "stride_h", "sxc", "KH", "KW", "G_MODE"],
    prune_configs_by={"early_config_prune": prune_by_shared_memory},
)(_conv_gemm_wgrad_kernel)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _wgrad_split(rows: int, c_out: int, columns: int, taps: int, device: torch.device) -> int:
    """Pixels per split of the wgrad reduction: enough programs for ~2 waves of 64x64 tiles, yet at
    least 4 aligned chunks of pixels per program (fewer, larger partials for big weights)."""
    align = _INTERPRETER_SPLIT_ALIGN if interpreting() else _GPU_SPLIT_ALIGN
    target = 4 if device.type != "cuda" else 2 * _sm_count(device.index or torch.cuda.current_device())
    tiles = triton.cdiv(c_out, 64) * triton.cdiv(columns, 64) * taps
    split = max(1, min(target // tiles, rows // (4 * align)))
    return triton.cdiv(triton.cdiv(rows, split), align) * align


def wgrad(mode, grad, y, mean, grad_mean, grad_var, weight, x, scale, shift, in_act, bias_grad, stride, padding):
    """Launch the wgrad kernel; returns ``(grad_w, grad_bias or None)``."""
    n, c_in, h, w = x.shape
    c_out, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
    h_out, w_out = grad.shape[2], grad.shape[3]
    m = n * h_out * w_out
    flat = flat_k(c_in, weight)
    taps, columns = (1, kh * kw * c_in) if flat else (kh * kw, c_in)
    rows_per_split = _wgrad_split(m, c_out, columns, taps, x.device)
    splits = triton.cdiv(m, rows_per_split)
    grad_w = torch.empty_like(weight)
    # One split writes grad_w directly (in its dtype and layout); several write fp32 partials.
    partial = grad_w[None] if splits == 1 else weight.new_empty((splits, *weight.shape), dtype=torch.float32)
    grad_b = torch.empty(splits, c_out, dtype=torch.float32, device=x.device) if bias_grad else None
    dummy = grad

    def grid(meta):
        return (triton.cdiv(c_out, meta["BLOCK_M"]) * triton.cdiv(columns, meta["BLOCK_N"]), taps, splits)

    launch(
        "wgrad", _conv_gemm_wgrad_kernel, _wgrad_tuned, INTERPRETER_WGRAD_CONFIG, grid,
        grad, *grad_sources(mode, grad, y, mean, grad_mean, grad_var),
        x, scale if scale is not None else dummy, shift if shift is not None else dummy,
        partial, grad_b if grad_b is not None else dummy,
        1.0 / m, m, c_in, h, w, c_out, h_out, w_out, rows_per_split,
        *grad.stride(), *nchw_strides(y), *x.stride(), *partial.stride(),
        stride[0], stride[1], padding[0], padding[1],
        KH=kh, KW=kw, FLAT_N=flat, G_MODE=mode, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        IN_ACT=int(in_act), BIAS_GRAD=bias_grad, PRECISION=dot_precision(x),
    )
    if splits > 1:
        grad_w.copy_(partial.sum(0))
    return grad_w, (grad_b.sum(0) if splits > 1 else grad_b[0]) if grad_b is not None else None

"""Implicit-GEMM 2-D convolution in Triton, forward, with a fused prologue and epilogue.

The convolution is a GEMM that is never materialised (no im2col buffer):
``out[m, co] = sum_k A[m, k] * B[k, co]`` with ``m = (n, ho, wo)`` an output pixel
(``M = N * H_out * W_out``), ``k = (r, s, ci)`` a filter tap and input channel
(``K = KH * KW * C_in``) and ``A[m, (r, s, ci)] = a[n, ci, ho * stride - pad + r, wo * stride - pad + s]``
(zero outside the image). The K loop is one flat loop over ``(tap, channel block)`` so that
Triton's software pipeline sees a single loop even for 1x1 convolutions with few channel blocks.

Layouts: any strides for every activation (channels_last is the fast layout, where a K block is
contiguous; NCHW works through its strides, no conversion); outputs follow ``_layout.py``. Tiles are
indexed in int32 (``M``, ``C`` < 2**31: see :func:`supports_conv_stats`) but every memory offset is
formed in int64, so tensors larger than 2**31 elements and views with huge strides are addressed
correctly. fp16/bf16 operands feed ``tl.dot`` directly; fp32 operands use TF32 only when
``torch.backends.cudnn.allow_tf32`` allows it, as ``nn.Conv2d`` would; accumulation is always fp32.
Nothing here syncs with the host or allocates by data, so launches can be captured in CUDA graphs
(once autotuning has run: tune eagerly before capture).

The backward kernels live in ``_conv_gemm_backward.py`` (data gradient) and ``_conv_gemm_wgrad.py``
(weight gradient); configs, launch and the fused loaders they share in ``_conv_gemm_common.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._layout import conv_output_size, empty_activation
from ._act import act_fwd
from ._conv_gemm_common import (
    dot_precision,
    flat_k,
    interpreting,
    launch,
    load_activation,
    make_config,
    nchw_strides,
    prune_by_shared_memory,
    stats_rows,
)

# No atomics anywhere: results are bitwise reproducible run to run (``_choice`` reads this).
DETERMINISTIC = True

_DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

GPU_FWD_CONFIGS = [
    make_config(128, 128, 64, 8, 3, GROUP_M=8),
    make_config(128, 128, 32, 4, 4, GROUP_M=8),
    make_config(128, 64, 64, 4, 4, GROUP_M=8),
    make_config(64, 128, 64, 4, 4, GROUP_M=8),
    make_config(64, 64, 64, 4, 3, GROUP_M=8),
    make_config(128, 64, 32, 4, 4, GROUP_M=8),
]
INTERPRETER_FWD_CONFIG = make_config(64, 64, 32, 4, 1, GROUP_M=2)


# ---- forward kernel -----------------------------------------------------------------------------------


@triton.jit
def _conv_gemm_fwd_kernel(
    x_ptr,  # [N, C_in, H, W] any strides, fp16/bf16/fp32
    w_ptr,  # [C_out, C_in, KH, KW] any strides, x's dtype
    out_ptr,  # [N, C_out, H_out, W_out] any strides, x's dtype
    scale_ptr, shift_ptr,  # [C_in] fp32: prologue BN scale/shift (optional)
    bias_ptr,  # [C_out] fp32 (optional)
    res_ptr,  # [N, C_out, H_out, W_out] any strides, x's dtype (optional)
    cnt_ptr, mean_ptr, m2_ptr,  # [T] / [T, C_out] / [T, C_out] fp32: BN partials per STATS_ROWS rows
    M, C_in, H, W, C_out, H_out, W_out,
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, son, soc, soh, sow, srn, src, srh, srw,
    stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr, FLAT_K: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, OUT_ACT: tl.constexpr, STATS: tl.constexpr,
    STATS_ROWS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out = epilogue(conv(prologue(x), w))``; one program per ``BLOCK_M x BLOCK_N`` output tile.

    prologue: ``act(x * scale + shift)`` per input channel, applied to each loaded tile.
    epilogue, ``STATS``: store ``y`` and per-``STATS_ROWS`` partial (count, mean, M2) of ``y`` as
    stored (rounded to its dtype) per output channel; else ``act(acc + bias + residual)``.
    FLOPs: ``2 * M * C_out * KH * KW * C_in``. Bytes: ``x`` (read ``ceil(C_out / BLOCK_N)`` times,
    mostly from L2), ``w``, ``out`` once, ``residual`` once, partials ``2 * 4 * C_out * M / STATS_ROWS``.
    Saved versus eager training (BN apply + activation, conv, BN statistics): the normalised activation is
    never written nor read back (``2 * |x|``), and the statistics pass over ``y`` (``|y|``) is gone.
    Saved versus eager inference (conv, + bias, + residual, ReLU): ``4 * |out|`` of round trips.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(C_out, BLOCK_N)
    # Grouped ordering: GROUP_M row tiles share their input tiles in L2 while sweeping C_out.
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < C_out
    img = offs_m // (H_out * W_out)
    pix = offs_m % (H_out * W_out)
    ho = pix // W_out
    wo = pix % W_out
    h_base = ho * stride_h - pad_h
    w_base = wo * stride_w - pad_w
    x_img = img.to(tl.int64) * sxn
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # Few input channels (the stem's 3): a K block spans (tap, channel) pairs instead of padding
        # 3 channels to BLOCK_K, which would waste 90% of the loads and MMAs.
        for k0 in range(0, KH * KW * C_in, BLOCK_K):
            kidx = k0 + offs_k
            k_ok = kidx < KH * KW * C_in
            tap = kidx // C_in
            chan = kidx - tap * C_in
            r = tap // KW
            s = tap - r * KW
            h = h_base[:, None] + r[None, :]
            w = w_base[:, None] + s[None, :]
            ok = m_ok[:, None] & k_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            a_offs = x_img[:, None] + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw + chan.to(tl.int64)[None, :] * sxc
            a = load_activation(x_ptr, a_offs, ok, chan[None, :], k_ok[None, :],
                                scale_ptr, shift_ptr, HAS_SCALE, HAS_SHIFT, IN_ACT)
            b_offs = offs_n[None, :] * swo + (chan * swi + r * swh + s * sww)[:, None]
            b = tl.load(w_ptr + b_offs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)
    else:
        c_blocks = tl.cdiv(C_in, BLOCK_K)
        for kk in range(KH * KW * c_blocks):
            tap = kk // c_blocks
            c0 = (kk - tap * c_blocks) * BLOCK_K
            r = tap // KW
            s = tap - r * KW
            h = h_base + r
            w = w_base + s
            row_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            chan = c0 + offs_k
            c_ok = chan < C_in
            x_row = x_img + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
            a_offs = x_row[:, None] + chan.to(tl.int64)[None, :] * sxc
            a = load_activation(x_ptr, a_offs, row_ok[:, None] & c_ok[None, :], chan[None, :], c_ok[None, :],
                                scale_ptr, shift_ptr, HAS_SCALE, HAS_SHIFT, IN_ACT)
            # The weight has far fewer than 2**31 elements: int32 offsets.
            b_offs = offs_n[None, :] * swo + chan[:, None] * swi + r * swh + s * sww
            b = tl.load(w_ptr + b_offs, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)

    out_rows = img.to(tl.int64) * son + ho.to(tl.int64) * soh + wo.to(tl.int64) * sow
    out_offs = out_rows[:, None] + offs_n.to(tl.int64)[None, :] * soc
    tile_ok = m_ok[:, None] & n_ok[None, :]
    if STATS:
        y = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + out_offs, y, mask=tile_ok)
        # Welford/Chan partials of y as stored, per block of STATS_ROWS rows: mean and M2 are
        # computed around the block mean (no E[y^2] - E[y]^2 cancellation).
        R: tl.constexpr = BLOCK_M // STATS_ROWS
        rows = pid_m * BLOCK_M + tl.arange(0, R)[:, None] * STATS_ROWS + tl.arange(0, STATS_ROWS)[None, :]
        rows_ok = (rows < M)[:, :, None]
        y3 = tl.where(rows_ok, tl.reshape(y.to(tl.float32), (R, STATS_ROWS, BLOCK_N)), 0.0)
        blk = pid_m * R + tl.arange(0, R)
        count = tl.minimum(tl.maximum(M - blk * STATS_ROWS, 0), STATS_ROWS).to(tl.float32)
        mean = tl.sum(y3, axis=1) / tl.maximum(count, 1.0)[:, None]
        centred = tl.where(rows_ok, y3 - mean[:, None, :], 0.0)
        m2 = tl.sum(centred * centred, axis=1)
        blk_ok = count > 0
        part_offs = blk.to(tl.int64)[:, None] * C_out + offs_n[None, :]
        part_ok = blk_ok[:, None] & n_ok[None, :]
        tl.store(mean_ptr + part_offs, mean, mask=part_ok)
        tl.store(m2_ptr + part_offs, m2, mask=part_ok)
        if pid_n == 0:
            tl.store(cnt_ptr + blk, count, mask=blk_ok)
    else:
        z = acc
        if HAS_BIAS:
            z = z + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        if HAS_RES:
            res_rows = img.to(tl.int64) * srn + ho.to(tl.int64) * srh + wo.to(tl.int64) * srw
            res_offs = res_rows[:, None] + offs_n.to(tl.int64)[None, :] * src
            z = z + tl.load(res_ptr + res_offs, mask=tile_ok, other=0.0).to(tl.float32)
        z = act_fwd(z, OUT_ACT)
        tl.store(out_ptr + out_offs, z.to(out_ptr.dtype.element_ty), mask=tile_ok)


_FWD_KEY = ["M", "C_in", "C_out", "H", "W", "stride_h", "sxc", "soc", "KH", "KW", "STATS", "HAS_RES"]
_conv_gemm_fwd_tuned = triton.autotune(
    configs=GPU_FWD_CONFIGS, key=_FWD_KEY, prune_configs_by={"early_config_prune": prune_by_shared_memory}
)(_conv_gemm_fwd_kernel)


# ---- launchers ------------------------------------------------------------------------------------------


def supports_conv(x, weight, stride, padding, dilation, groups) -> bool:
    """The shapes and dtypes the implicit-GEMM kernels handle; the reference takes the rest."""
    if groups != 1 or tuple(dilation) != (1, 1) or x.dim() != 4 or weight.dim() != 4:
        return False
    if x.dtype not in _DOT_DTYPES or weight.dtype != x.dtype:
        return False
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        return False
    # The interpreter's bf16 tl.dot gives wrong answers: bf16 runs on the GPU only.
    if x.dtype == torch.bfloat16 and x.device.type != "cuda":
        return False
    shape = conv_output_size(x.shape, weight.shape, stride, padding, dilation)
    if min(shape) < 1 or x.numel() == 0:
        return False
    # Tile indices are int32 (memory offsets are int64): rows and channels must fit.
    rows = max(shape[0] * shape[2] * shape[3], x.shape[0] * x.shape[2] * x.shape[3])
    return rows < 2**31 - 2**16 and max(x.shape[1], shape[1]) < 2**31 - 2**16


def supports_conv_stats(x, in_scale, in_shift, in_act, weight, stride, padding, dilation, groups) -> bool:
    return supports_conv(x, weight, stride, padding, dilation, groups)


def supports_conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, act) -> bool:
    return supports_conv(x, weight, stride, padding, dilation, groups)


def _conv_fwd(x, weight, out, scale, shift, in_act, bias, residual, act, stats, stride, padding):
    """Launch the forward kernel; ``stats`` is ``(counts, means, m2s)`` or None."""
    n, c_in, h, w = x.shape
    _, c_out, h_out, w_out = out.shape
    m = n * h_out * w_out
    dummy = out  # never dereferenced: the matching constexpr flag is off
    cnt, mean, m2 = stats if stats is not None else (dummy, dummy, dummy)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]),)

    launch(
        "fwd", _conv_gemm_fwd_kernel, _conv_gemm_fwd_tuned, INTERPRETER_FWD_CONFIG, grid,
        x, weight, out,
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        bias if bias is not None else dummy, residual if residual is not None else dummy,
        cnt, mean, m2,
        m, c_in, h, w, c_out, h_out, w_out,
        *x.stride(), *weight.stride(), *out.stride(), *nchw_strides(residual),
        stride[0], stride[1], padding[0], padding[1],
        KH=weight.shape[2], KW=weight.shape[3], FLAT_K=flat_k(c_in, weight),
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, IN_ACT=int(in_act),
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, OUT_ACT=int(act), STATS=stats is not None,
        STATS_ROWS=stats_rows(), PRECISION=dot_precision(x),
    )


def conv_stats(x, in_scale, in_shift, in_act, weight, stride, padding, dilation, groups):
    """``y = conv(act(x * in_scale + in_shift), weight)`` and the batch mean / biased variance of
    ``y`` per output channel (``reference.conv_stats``): one implicit-GEMM pass writes ``y`` and the
    per-tile partials, ``combine_partial_stats`` merges them (Chan) into fp32 ``mean``, ``var``."""
    from ._stats import combine_partial_stats

    shape = conv_output_size(x.shape, weight.shape, stride, padding, dilation)
    y = empty_activation(x, shape)
    rows = shape[0] * shape[2] * shape[3]
    blocks = triton.cdiv(rows, stats_rows())
    counts = torch.empty(blocks, dtype=torch.float32, device=x.device)
    means = torch.empty(blocks, shape[1], dtype=torch.float32, device=x.device)
    m2s = torch.empty_like(means)
    _conv_fwd(x, weight, y, in_scale, in_shift, in_act, None, None, 0, (counts, means, m2s), stride, padding)
    mean, var = combine_partial_stats(counts, means, m2s)
    return y, mean, var


def conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, act):
    """``act(conv(x, weight) + bias + residual)`` (``reference.conv_bias_act``) in one pass: the
    epilogue adds the fp32 bias and the residual to the fp32 accumulator and rounds once."""
    out = empty_activation(x, conv_output_size(x.shape, weight.shape, stride, padding, dilation))
    _conv_fwd(x, weight, out, None, None, 0, bias, residual, act, None, stride, padding)
    return out

"""Implicit-GEMM 2-D convolution in Triton, backward: data and weight gradients with fused loads.

This module holds the data gradient and the two backward kernels' entry points; the weight
gradient's kernel is in ``_conv_gemm_wgrad.py``. Both read the conv output gradient ``g`` through
``load_grad`` (``_conv_gemm_common.py``), which builds it on the fly from what the forward saved, so
``g`` is never written to memory:

- ``G_MODE = 0``: ``g = grad`` as given;
- ``G_MODE = 1``: ``g = grad * (out > 0)`` (the epilogue ReLU of ``conv_bias_act``);
- ``G_MODE = 2``: ``g = grad_y + grad_mean / M + 2 * grad_var * (y - mean) / M`` (the BN statistics
  of ``conv_stats``, ``M = N * H_out * W_out``).

dgrad, ``grad_a[n, c, h, w] = sum_{k, r, s} g[n, k, (h + p - r) / st, (w + p - s) / st] * w[k, c, r, s]``
(terms whose division is not exact vanish), is an implicit GEMM over input pixels x ``C_in`` with
``K = taps * C_out``. For stride ``st > 1`` the input pixels are split into ``st * st`` phases
``(h % st, w % st)`` (grid axis 1); within a phase only the taps ``r = (h + p) mod st`` contribute, so
each phase loops over ``ceil(KH / st) * ceil(KW / st)`` taps and no multiply is wasted on zeros.
Its epilogue applies the forward prologue's chain rule: ``dz = grad_a * (x * scale + shift > 0)``,
``grad_x = dz * scale`` and per-channel partial sums of ``dz * x`` and ``dz`` (grad of scale, shift).

wgrad, ``grad_w[k, c, r, s] = sum_{n, ho, wo} g[n, k, ho, wo] * a[n, c, ho * st - p + r, wo * st - p + s]``,
is a GEMM ``C_out x C_in`` per tap with the pixels as its reduction; ``a = act(x * scale + shift)``
is recomputed from ``x`` while loading (never materialised). The pixels are split over grid axis 2
so that small weight gradients still fill the GPU; the split partials are summed by one reduction.
For ``conv_bias_act`` the same loop also sums ``g`` per output channel: the bias gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _activation
from ..._layout import empty_activation
from ._act import NONE, act_bwd
from ._conv_gemm import supports_conv
from ._conv_gemm_common import (
    dot_precision,
    grad_sources,
    launch,
    load_grad,
    make_config,
    nchw_strides,
    prune_by_shared_memory,
    stats_rows,
)
from ._conv_gemm_wgrad import wgrad

# No atomics anywhere: results are bitwise reproducible run to run (``_choice`` reads this).
DETERMINISTIC = True

GPU_DGRAD_CONFIGS = [
    make_config(128, 128, 64, 8, 3, GROUP_M=8),
    make_config(128, 64, 64, 4, 4, GROUP_M=8),
    make_config(64, 128, 64, 4, 4, GROUP_M=8),
    make_config(64, 64, 64, 4, 3, GROUP_M=8),
    make_config(128, 128, 32, 4, 4, GROUP_M=8),
]
# wgrad: BLOCK_M over C_out, BLOCK_N over C_in, BLOCK_K over pixels.
INTERPRETER_DGRAD_CONFIG = make_config(64, 64, 32, 4, 1, GROUP_M=2)


@triton.jit
def _conv_gemm_dgrad_kernel(
    gy_ptr, y_ptr,  # [N, C_out, H_out, W_out] any strides: grad and (G_MODE 1: out, 2: y)
    mean_ptr, gmean_ptr, gvar_ptr,  # [C_out] fp32 (G_MODE 2)
    w_ptr,  # [C_out, C_in, KH, KW] any strides
    x_ptr, scale_ptr, shift_ptr,  # [N, C_in, H, W] and [C_in] fp32: the forward prologue
    dx_ptr,  # [N, C_in, H, W] any strides, x's dtype
    sum_dzx_ptr, sum_dz_ptr,  # [P * T, C_in] fp32 partial sums per STATS_ROWS pixels of each phase
    inv_count, N, C_in, H, W, C_out, H_out, W_out,
    sgn, sgc, sgh, sgw, syn, syc, syh, syw, swo, swi, swh, sww, sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
    stride_h, stride_w, pad_h, pad_w, blocks_per_phase,
    KH: tl.constexpr, KW: tl.constexpr, G_MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_ACT: tl.constexpr,
    WRITE_DX: tl.constexpr, AFFINE_SUMS: tl.constexpr, STATS_ROWS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Data gradient of ``conv(act(x * scale + shift), w)`` for one phase's ``BLOCK_M`` pixels x
    ``BLOCK_N`` input channels. FLOPs: ``2 * N * H_out * W_out * C_out * KH * KW * C_in`` (the useful ones
    only, thanks to the phases). Bytes: ``g``'s sources (``grad``, ``y`` or ``out``) read
    ``ceil(C_in / BLOCK_N)`` times (mostly L2), ``w``, ``x`` once, ``grad_x`` written once, partials
    ``2 * 4 * C_in * N * H * W / STATS_ROWS``. Saved versus eager (BN-stats backward, conv backward,
    ReLU backward, BN-affine backward): ``g`` is neither written nor read (``2 * |y|``), ``grad_a`` is not
    written nor read twice (``3 * |x|``), and the activation ``act(x * scale + shift)`` is not rebuilt.
    """
    phase = tl.program_id(1)
    ph = phase // stride_w
    pw = phase % stride_w
    hp = tl.cdiv(H - ph, stride_h)  # rows h = ph + stride_h * i of this phase
    wp = tl.cdiv(W - pw, stride_w)
    m_phase = N * hp * wp
    pid = tl.program_id(0)
    num_m = tl.cdiv(N * tl.cdiv(H, stride_h) * tl.cdiv(W, stride_w), BLOCK_M)
    num_n = tl.cdiv(C_in, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < m_phase
    n_ok = offs_n < C_in
    # A phase may be empty (H < stride): keep the divisors positive, m_ok masks everything then.
    phase_pixels = tl.maximum(hp * wp, 1)
    img = offs_m // phase_pixels
    i = (offs_m % phase_pixels) // tl.maximum(wp, 1)
    j = offs_m % tl.maximum(wp, 1)
    g_img = img.to(tl.int64) * sgn
    y_img = img.to(tl.int64) * syn
    offs_k = tl.arange(0, BLOCK_K)

    # Taps r with (h + pad - r) % stride == 0, i.e. r = r0, r0 + stride, ...; then ho = i + (ph + pad - r) / stride.
    r0 = (ph + pad_h) % stride_h
    s0 = (pw + pad_w) % stride_w
    taps_w = tl.cdiv(KW - s0, stride_w)
    taps = tl.cdiv(KH - r0, stride_h) * taps_w
    k_blocks = tl.cdiv(C_out, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(taps * k_blocks):
        t = kk // k_blocks
        k0 = (kk - t * k_blocks) * BLOCK_K
        r = r0 + (t // taps_w) * stride_h
        s = s0 + (t % taps_w) * stride_w
        # Exact divisions of possibly negative numbers: shift by a multiple of the stride first.
        ho = i + (ph + pad_h - r + KH * stride_h) // stride_h - KH
        wo = j + (pw + pad_w - s + KW * stride_w) // stride_w - KW
        row_ok = m_ok & (ho >= 0) & (ho < H_out) & (wo >= 0) & (wo < W_out)
        chan = k0 + offs_k
        k_ok = chan < C_out
        g_rows = g_img + ho.to(tl.int64) * sgh + wo.to(tl.int64) * sgw
        y_rows = y_img + ho.to(tl.int64) * syh + wo.to(tl.int64) * syw
        chan64 = chan.to(tl.int64)[None, :]
        g = load_grad(gy_ptr, g_rows[:, None] + chan64 * sgc, y_ptr, y_rows[:, None] + chan64 * syc,
                      row_ok[:, None] & k_ok[None, :], chan[None, :], k_ok[None, :],
                      mean_ptr, gmean_ptr, gvar_ptr, inv_count, G_MODE)
        b = tl.load(w_ptr + chan[:, None] * swo + offs_n[None, :] * swi + r * swh + s * sww,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(g.to(b.dtype), b, acc, input_precision=PRECISION)

    h = ph + stride_h * i
    w = pw + stride_w * j
    tile_ok = m_ok[:, None] & n_ok[None, :]
    dz = acc
    if IN_ACT != NONE or AFFINE_SUMS:
        x_rows = img.to(tl.int64) * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
        x = tl.load(x_ptr + x_rows[:, None] + offs_n.to(tl.int64)[None, :] * sxc, mask=tile_ok, other=0.0)
        x = x.to(tl.float32)
        if IN_ACT != NONE:
            z = x
            if HAS_SCALE:
                z = z * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
            if HAS_SHIFT:
                z = z + tl.load(shift_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
            dz = act_bwd(dz, z, IN_ACT)
        if AFFINE_SUMS:
            R: tl.constexpr = BLOCK_M // STATS_ROWS
            blk = pid_m * R + tl.arange(0, R)
            part = (phase * blocks_per_phase + blk).to(tl.int64)[:, None] * C_in + offs_n[None, :]
            part_ok = (blk < blocks_per_phase)[:, None] & n_ok[None, :]
            dz_ok = tl.where(tile_ok, dz, 0.0)
            tl.store(sum_dz_ptr + part, tl.sum(tl.reshape(dz_ok, (R, STATS_ROWS, BLOCK_N)), axis=1), mask=part_ok)
            if HAS_SCALE:
                dzx = tl.reshape(dz_ok * x, (R, STATS_ROWS, BLOCK_N))
                tl.store(sum_dzx_ptr + part, tl.sum(dzx, axis=1), mask=part_ok)
    if WRITE_DX:
        if HAS_SCALE:
            dz = dz * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        dx_rows = img.to(tl.int64) * sdn + h.to(tl.int64) * sdh + w.to(tl.int64) * sdw
        tl.store(dx_ptr + dx_rows[:, None] + offs_n.to(tl.int64)[None, :] * sdc,
                 dz.to(dx_ptr.dtype.element_ty), mask=tile_ok)


_dgrad_tuned = triton.autotune(
    configs=GPU_DGRAD_CONFIGS, key=["N", "C_in", "C_out", "H", "W", "stride_h", "sxc", "KH", "KW", "G_MODE"],
    prune_configs_by={"early_config_prune": prune_by_shared_memory},
)(_conv_gemm_dgrad_kernel)


def _dgrad(mode, grad, y, mean, grad_mean, grad_var, weight, x, scale, shift, in_act, need_dx, affine_sums,
           stride, padding):
    """Launch the dgrad kernel; returns ``(grad_x or None, sum(dz * x) or None, sum(dz) or None)``."""
    n, c_in, h, w = x.shape
    c_out, h_out, w_out = grad.shape[1], grad.shape[2], grad.shape[3]
    dx = empty_activation(x, x.shape) if need_dx else None
    rows = stats_rows()
    phases = stride[0] * stride[1]
    blocks = triton.cdiv(n * triton.cdiv(h, stride[0]) * triton.cdiv(w, stride[1]), rows)
    sum_dz = torch.empty(phases * blocks, c_in, dtype=torch.float32, device=x.device) if affine_sums else None
    sum_dzx = torch.empty_like(sum_dz) if affine_sums and scale is not None else None
    dummy = grad
    grid_rows = n * triton.cdiv(h, stride[0]) * triton.cdiv(w, stride[1])

    def grid(meta):
        return (triton.cdiv(grid_rows, meta["BLOCK_M"]) * triton.cdiv(c_in, meta["BLOCK_N"]), phases)

    launch(
        "dgrad", _conv_gemm_dgrad_kernel, _dgrad_tuned, INTERPRETER_DGRAD_CONFIG, grid,
        grad, *grad_sources(mode, grad, y, mean, grad_mean, grad_var), weight,
        x, scale if scale is not None else dummy, shift if shift is not None else dummy,
        dx if dx is not None else dummy,
        sum_dzx if sum_dzx is not None else dummy, sum_dz if sum_dz is not None else dummy,
        1.0 / (n * h_out * w_out), n, c_in, h, w, c_out, h_out, w_out,
        *grad.stride(), *nchw_strides(y), *weight.stride(), *x.stride(), *nchw_strides(dx),
        stride[0], stride[1], padding[0], padding[1], blocks,
        KH=weight.shape[2], KW=weight.shape[3], G_MODE=mode,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, IN_ACT=int(in_act),
        WRITE_DX=need_dx, AFFINE_SUMS=affine_sums, STATS_ROWS=rows, PRECISION=dot_precision(x),
    )
    return (dx, sum_dzx.sum(0) if sum_dzx is not None else None, sum_dz.sum(0) if sum_dz is not None else None)


def supports_conv_stats_backward(grad_y, grad_mean, grad_var, x, in_scale, in_shift, in_act, weight, y, mean,
                                 stride, padding, dilation, groups, output_mask) -> bool:

    return supports_conv(x, weight, stride, padding, dilation, groups)


def supports_conv_bias_act_backward(grad_out, x, weight, out, act, stride, padding, dilation, groups,
                                    output_mask) -> bool:

    return supports_conv(x, weight, stride, padding, dilation, groups)


def conv_stats_backward(grad_y, grad_mean, grad_var, x, in_scale, in_shift, in_act, weight, y, mean,
                        stride, padding, dilation, groups, output_mask):
    """Gradients of ``conv_stats`` (``reference.conv_stats_backward``): one dgrad launch (grad_x and the
    prologue's scale/shift gradients) and one wgrad launch, both rebuilding ``g`` from
    ``(grad_y, grad_mean, grad_var, y, mean)`` as they load it."""
    need_x, need_affine, need_w = output_mask
    affine = need_affine and (in_scale is not None or in_shift is not None)
    grad_x = grad_scale = grad_shift = grad_w = None
    sources = (2, grad_y, y, mean, grad_mean, grad_var)
    if need_x or affine:
        grad_x, grad_scale, grad_shift = _dgrad(*sources, weight, x, in_scale, in_shift, in_act, need_x, affine,
                                                stride, padding)
        grad_shift = grad_shift if in_shift is not None else None
    if need_w:
        grad_w, _ = wgrad(*sources, weight, x, in_scale, in_shift, in_act, False, stride, padding)
    return grad_x, grad_scale, grad_shift, grad_w


def conv_bias_act_backward(grad_out, x, weight, out, act, stride, padding, dilation, groups, output_mask):
    """Gradients of ``conv_bias_act`` (``reference.conv_bias_act_backward``; ``out``: the output, or the
    pre-activation). With ReLU, ``dz = grad_out * (out > 0)`` is written only when the residual's gradient
    (which is ``dz``) is asked for; otherwise the mask is applied as the GEMMs load ``grad_out``. Other
    activations (an inference op's rare backward) write ``dz`` first. The bias gradient comes out of the
    wgrad loop when it runs."""
    need_x, need_w, need_bias, need_res = output_mask
    grad_res = None
    if need_res or act not in (_activation.NONE, _activation.RELU):
        dz = _activation.grad(grad_out.float(), out.float(), act) if act else grad_out
        grad_res = empty_activation(out, out.shape)
        grad_res.copy_(dz)
        sources = (0, grad_res, None, None, None, None)
    else:
        relu = act == _activation.RELU
        sources = (1 if relu else 0, grad_out, out if relu else None, None, None, None)
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x, _, _ = _dgrad(*sources, weight, x, None, None, 0, True, False, stride, padding)
    if need_w:
        grad_w, grad_b = wgrad(*sources, weight, x, None, None, 0, need_bias, stride, padding)
    if need_bias and grad_b is None:
        dz = grad_res if grad_res is not None else _activation.grad(grad_out, out, act)
        grad_b = dz.sum((0, 2, 3), dtype=torch.float32)
    return grad_x, grad_w, grad_b, (grad_res if need_res else None)

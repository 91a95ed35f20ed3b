"""Per-channel batch statistics of a conv output, in two deterministic levels (no atomics).

Level 1 (``_bn_stats_partial_kernel``): the ``M = N*H*W`` rows are cut in ``T`` chunks; each
program owns one chunk and one block of channels and walks it in ``[BLOCK_M, BLOCK_C]`` tiles.
For each tile it computes the tile's own mean and sum of squared deviations from that mean
(exact two-pass in registers), then merges it into its running ``(count, mean, M2)`` with Chan's
formula. It writes per-chunk ``means`` and ``M2`` ``[T, C]`` in fp32.

Level 2 (``_bn_stats_combine_kernel``, also the public :func:`combine_partial_stats` that the
implicit-GEMM conv epilogue uses): for each channel, the ``T`` partials are merged block by
block, in a fixed order, again with Chan's formula: ``mean = sum(n_i mean_i) / n`` and
``M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2)``, then ``var = M2 / n`` (biased, as BN uses).

Why not ``E[y^2] - E[y]^2``: with ``|mean| >> std`` the two terms cancel and fp32 loses every
digit of the variance; every quantity here is a deviation from a nearby mean instead, so the
error is that of fp32 storage of ``y`` itself. Deterministic: fixed chunking per shape, fixed
merge order, no atomics (hence no ``reset_to_zero`` and nothing to change for
``torch.use_deterministic_algorithms``).

Traffic: one read of ``y`` (``M * C`` elements) plus ``2 * T * C`` fp32 partials, versus eager
``torch.var_mean`` on an fp16 tensor, which reads ``y``, upcasts (a write and a read of an fp32
copy) and reduces. FLOPs: about 5 per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiling import (
    INTERPRETER_TILE,
    channels_inner,
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


@tuned(tile_configs([(64, 64), (128, 32), (32, 128), (256, 16)]), key=["M", "C", "HW", "ROWS", "CL"],
       interpreter=INTERPRETER_TILE)
@triton.jit
def _bn_stats_partial_kernel(
    y_ptr,  # [N, C, H, W] activation, strides (s_n, s_c, s_hw)
    mean_ptr,  # [T, C] fp32 out: mean of each row chunk, minus the shift y[0, c, 0, 0]
    m2_ptr,  # [T, C] fp32 out: sum of squared deviations from that mean
    M, C, HW, ROWS,
    s_n, s_c, s_hw,
    CL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Chunk ``t`` (rows ``[t*ROWS, (t+1)*ROWS)``) x channel block: Welford/Chan over tiles of
    ``y - y[0, c, 0, 0]``. One read of its part of ``y``; ~6 FLOPs per element; writes
    ``2 * BLOCK_C`` fp32."""
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = c < C
    # One shift per channel for all chunks: every mean below is then of size ~std, not ~|mean|,
    # and the between-tile terms (mean_i - mean)^2 keep their digits.
    shift = per_channel(tl.load(y_ptr + c.to(tl.int64) * s_c, mask=c_valid, other=0.0).to(tl.float32), CL)
    start = t * ROWS
    end = tl.minimum(start + ROWS, M)
    count = tl.full([BLOCK_C], 0.0, tl.float32)
    mean = tl.full([BLOCK_C], 0.0, tl.float32)
    m2 = tl.full([BLOCK_C], 0.0, tl.float32)
    for row0 in range(start, end, BLOCK_M):
        n, hw, row_valid = rows_of(row0, end, HW, BLOCK_M)
        mask = tile_mask(row_valid, c_valid, CL)
        x = tl.load(y_ptr + tile_offsets(n, hw, c, s_n, s_c, s_hw, CL), mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - shift, 0.0)
        n_b = tl.minimum(end - row0, BLOCK_M).to(tl.float32)
        mean_b = sum_rows(x, CL) / n_b
        dev = tl.where(mask, x - per_channel(mean_b, CL), 0.0)
        m2_b = sum_rows(dev * dev, CL)
        total = count + n_b
        delta = mean_b - mean
        frac = n_b / total
        mean += delta * frac
        m2 += m2_b + delta * delta * count * frac
        count = total
    out = t * C + c
    tl.store(mean_ptr + out, mean, mask=c_valid)
    tl.store(m2_ptr + out, m2, mask=c_valid)


@triton.jit
def _bn_stats_combine_kernel(
    counts_ptr,  # [T] or [T, C] fp32 element counts (strides s_ct, s_cc); unused if not HAS_COUNTS
    means_ptr,  # [T, C] fp32, contiguous
    m2s_ptr,  # [T, C] fp32, contiguous
    shift_ptr,  # [C] (stride s_shift) any float dtype: the partial means are of data minus it
    mean_out_ptr,  # [C] fp32 out
    var_out_ptr,  # [C] fp32 out: biased variance
    T, C, M, ROWS, s_ct, s_cc, s_shift,
    HAS_COUNTS: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Chan merge of ``T`` partials per channel, ``BLOCK_T`` at a time in a fixed order. Without
    ``counts_ptr`` the counts are those of ``row_chunks``: ``clamp(M - t*ROWS, 0, ROWS)``.
    Reads ``(2 or 3) * T * C`` fp32, writes ``2 * C``; ~10 FLOPs per partial. Negligible next to
    level 1 (``T`` is a few hundred at most), but it replaces a chain of small torch ops."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = c < C
    count = tl.full([BLOCK_C], 0.0, tl.float32)
    mean = tl.full([BLOCK_C], 0.0, tl.float32)
    m2 = tl.full([BLOCK_C], 0.0, tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        mask = (t < T)[:, None] & c_valid[None, :]
        if HAS_COUNTS:
            n_i = tl.load(counts_ptr + t[:, None] * s_ct + c[None, :] * s_cc, mask=mask, other=0.0).to(tl.float32)
        else:
            rows = tl.minimum(tl.maximum(M - t * ROWS, 0), ROWS).to(tl.float32)
            n_i = tl.where(mask, rows[:, None], 0.0)
        off = t[:, None] * C + c[None, :]
        valid = mask & (n_i > 0)
        # Empty chunks may hold anything (0/0 means): never let them into a product.
        mean_i = tl.where(valid, tl.load(means_ptr + off, mask=mask, other=0.0), 0.0)
        m2_i = tl.where(valid, tl.load(m2s_ptr + off, mask=mask, other=0.0), 0.0)
        n_b = sum_rows(n_i, True)
        mean_b = sum_rows(n_i * mean_i, True) / tl.maximum(n_b, 1.0)
        dev = tl.where(valid, mean_i - mean_b[None, :], 0.0)
        m2_b = sum_rows(m2_i + n_i * dev * dev, True)
        total = count + n_b
        frac = tl.where(total > 0, n_b / tl.maximum(total, 1.0), 0.0)
        delta = mean_b - mean
        mean += delta * frac
        m2 += m2_b + delta * delta * count * frac
        count = total
    if HAS_SHIFT:
        mean += tl.load(shift_ptr + c.to(tl.int64) * s_shift, mask=c_valid, other=0.0).to(tl.float32)
    tl.store(mean_out_ptr + c, mean, mask=c_valid)
    tl.store(var_out_ptr + c, m2 / tl.where(c_valid, count, 1.0), mask=c_valid)


_COMBINE_BLOCK_T = 32


def _combine(counts, means, m2s, shift, s_shift: int, m_rows: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    t, c = means.shape
    mean = torch.empty(c, dtype=torch.float32, device=means.device)
    var = torch.empty_like(mean)
    block_c = min(128, triton.next_power_of_2(c))
    if counts is None:
        counts_arg, s_ct, s_cc = means, 0, 0
    else:
        counts_arg = counts
        s_ct, s_cc = (counts.stride(0), 0) if counts.dim() == 1 else counts.stride()
    _bn_stats_combine_kernel[(triton.cdiv(c, block_c),)](
        counts_arg, means, m2s, shift if shift is not None else means, mean, var, t, c, m_rows, rows, s_ct, s_cc,
        s_shift, HAS_COUNTS=counts is not None, HAS_SHIFT=shift is not None, BLOCK_T=_COMBINE_BLOCK_T, BLOCK_C=block_c,
    )
    return mean, var


def combine_partial_stats(
    counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor, shift: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-tile statistics into per-channel ``(mean, biased var)``, fp32, deterministic.

    ``counts``: fp32 ``[T]`` (the same count for every channel of a tile) or ``[T, C]`` element
    counts; ``means``/``m2s``: fp32 ``[T, C]`` per-tile means and sums of squared deviations from
    them. Tiles with count 0 are ignored whatever their means hold. One launch, no host sync,
    no atomics; safe inside CUDA-graph capture.

    ``shift`` (optional, ``[C]``): the partial means are of ``y - shift`` (any per-channel value
    near the data, e.g. its first element); it is added back to the mean. Tile means stored in
    fp32 near a large ``|mean|`` lose the digits of the between-tile spread, so a producer that
    can shift should: with ``|mean| / std = 1e4`` the variance error drops from ~1e-4 to ~1e-7.
    """
    if means.dim() != 2 or m2s.shape != means.shape or counts.shape not in ((means.shape[0],), means.shape):
        raise ValueError(
            f"combine_partial_stats: expected counts [T] or [T, C] and means/m2s [T, C], got "
            f"{tuple(counts.shape)}, {tuple(means.shape)}, {tuple(m2s.shape)}"
        )
    means = means.float().contiguous()
    m2s = m2s.float().contiguous()
    if shift is not None and shift.shape != (means.shape[1],):
        raise ValueError(f"combine_partial_stats: shift must have shape ({means.shape[1]},), got {tuple(shift.shape)}")
    return _combine(counts.float(), means, m2s, shift, shift.stride(0) if shift is not None else 0, 0, 0)


def batch_mean_var(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (fp32) of a mergeable ``[N, C, H, W]`` activation:
    two launches (partials, combine), one read of ``y``."""
    n, c, h, w = y.shape
    m = n * h * w
    t, rows = row_chunks(m, c, y.device)
    means = torch.empty((t, c), dtype=torch.float32, device=y.device)
    m2s = torch.empty_like(means)
    s_n, s_c, s_hw = strides(y)
    _bn_stats_partial_kernel[lambda meta: (t, triton.cdiv(c, meta["BLOCK_C"]))](
        y, means, m2s, m, c, h * w, rows, s_n, s_c, s_hw, CL=channels_inner(y),
    )
    return _combine(None, means, m2s, y, s_c, m, rows)

"""``nn.BatchNorm2d``'s running-statistics update in one launch (the reference takes ~10 small ones).

``num_batches_tracked += 1``; ``running = (1 - f) * running + f * batch`` with ``f = momentum``
or ``1 / num_batches_tracked`` (cumulative average, read on the device: no host sync), and the
unbiased variance ``var * count / (count - 1)``; in fp64 like the reference. Python floats reach
the kernel as fp32 scalars, so ``momentum`` and ``count / (count - 1)`` travel as a (hi, lo) pair
of fp32 whose fp64 sum carries ~48 bits: ``0.1`` is not rounded to fp32's ``0.100000001``.
One program walks all channels, so that the counter it increments is read before it is written.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl


@triton.jit
def _bn_running_stats_kernel(
    rmean_ptr, rvar_ptr,  # [C] running statistics, any float dtype, updated in place
    nbt_ptr,  # [] int64 num_batches_tracked, incremented
    mean_ptr, var_ptr,  # [C] fp32 batch mean and biased variance
    C, mom_hi, mom_lo, unb_hi, unb_lo,
    CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Reads and writes ``4 * C`` numbers; ~6 fp64 FLOPs per channel."""
    batches = tl.load(nbt_ptr) + 1
    # Adding scalars to an fp64 zero promotes them exactly (the interpreter passes Python floats).
    zero = tl.full([BLOCK_C], 0.0, tl.float64)
    if CUMULATIVE:
        factor = 1.0 / (zero + batches.to(tl.float64))
    else:
        factor = (zero + mom_hi) + mom_lo
    unbias = (zero + unb_hi) + unb_lo
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        valid = c < C
        mean = tl.load(mean_ptr + c, mask=valid, other=0.0).to(tl.float64)
        var = tl.load(var_ptr + c, mask=valid, other=0.0).to(tl.float64)
        rmean = tl.load(rmean_ptr + c, mask=valid, other=0.0).to(tl.float64)
        rvar = tl.load(rvar_ptr + c, mask=valid, other=0.0).to(tl.float64)
        rmean = factor * mean + (1.0 - factor) * rmean
        rvar = factor * (var * unbias) + (1.0 - factor) * rvar
        tl.store(rmean_ptr + c, rmean.to(rmean_ptr.dtype.element_ty), mask=valid)
        tl.store(rvar_ptr + c, rvar.to(rvar_ptr.dtype.element_ty), mask=valid)
    tl.store(nbt_ptr, batches)


def _split(value: float) -> tuple[float, float]:
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


def update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    """``reference.update_running_stats_`` in one launch (see the module docstring)."""
    c = running_mean.shape[0]
    mom = _split(0.0 if momentum is None else float(momentum))
    unb = _split(count / (count - 1))
    _bn_running_stats_kernel[(1,)](
        running_mean, running_var, num_batches_tracked, mean, var, c, *mom, *unb,
        CUMULATIVE=momentum is None, BLOCK_C=min(1024, triton.next_power_of_2(c)),
    )


def supports(running_mean, running_var, num_batches_tracked, mean, var, count, momentum) -> bool:
    # fp32 running statistics only: fp64 -> fp16/bf16 stores round differently across Triton
    # versions (via fp32), and such models are rare; they stay on the reference.
    vectors = (running_mean, running_var, mean, var)
    return (
        all(v.dim() == 1 and v.is_contiguous() and v.dtype == torch.float32 for v in vectors)
        and num_batches_tracked.dtype == torch.int64
        and num_batches_tracked.numel() == 1
    )

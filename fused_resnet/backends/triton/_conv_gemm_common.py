"""What the implicit-GEMM conv kernels (``_conv_gemm``, ``_conv_gemm_backward``, ``_conv_gemm_wgrad``)
share: how a config is chosen and launched, and the loaders that fuse elementwise work into the GEMM
operands (the forward prologue, ``load_activation``; the backward's output gradient, ``load_grad``).

Configs: on a GPU every kernel is autotuned over its ``GPU_*_CONFIGS`` (pruned by shared memory);
under Triton's interpreter, where autotuning several configs does not work and the cost is per
program and per operation, each kernel runs one large-tile config; tests force any config with
:func:`forced_config`. Offsets: loaders take int64 offsets, built by the kernels from int32 tile
indices, so tensors past 2**31 elements and views with huge strides are addressed correctly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from ._act import NONE, RELU, act_fwd


@triton.jit
def _probe_kernel():
    pass


# Kernels were built for the interpreter iff TRITON_INTERPRET=1 when triton.jit ran on them; later
# changes of the variable do not matter, so decide once, from what triton.jit produced.
_INTERPRETED = not isinstance(_probe_kernel, triton.runtime.JITFunction)


def interpreting() -> bool:
    """True when this module's kernels run on the CPU through Triton's interpreter."""
    return _INTERPRETED


# ---- configurations ---------------------------------------------------------------------------------
# GPU: tiles of 64-128 for M/N and 32-64 for K, 3-4 stages (H100, 228 KB of shared memory per SM).
# Every configuration listed here is run against the reference by tests/test_triton_conv_gemm_gpu.py on a
# GPU (test_every_config_cuda), because 8-warp flattened conv loops have been miscompiled by some
# Triton versions. Under the interpreter (CPU tests) autotuning with several configurations does not
# work, and the cost is per program and per operation, not per element: one large-tile config.


def make_config(bm, bn, bk, warps, stages, **extra):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **extra}, num_warps=warps, num_stages=stages)


# Per-tile BN partials and reductions are written per block of STATS_ROWS output rows (not per program)
# so their buffers do not depend on which BLOCK_M the autotuner picks; every BLOCK_M is a multiple.
GPU_STATS_ROWS = 64
INTERPRETER_STATS_ROWS = 16
_SMEM_LIMIT = 220 * 1024

_forced: dict[str, triton.Config] = {}


def stats_rows() -> int:
    return INTERPRETER_STATS_ROWS if interpreting() else GPU_STATS_ROWS


@contextlib.contextmanager
def forced_config(kernel: str, config: triton.Config) -> Iterator[None]:
    """Run ``kernel`` (``"fwd"``, ``"dgrad"``, ``"wgrad"``) with exactly ``config`` inside the block,
    bypassing the autotuner: lets the tests check every shipped configuration."""
    previous = _forced.get(kernel)
    _forced[kernel] = config
    try:
        yield
    finally:
        if previous is None:
            _forced.pop(kernel, None)
        else:
            _forced[kernel] = previous


def fits_shared_memory(config: triton.Config, elem_size: int) -> bool:
    """Whether a config's pipelined A and B tiles fit in shared memory for ``elem_size``-byte operands (an
    estimate: layout conversions take more, and the autotuner skips what the compiler then rejects)."""
    kw = config.kwargs
    tile = kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]
    return max(config.num_stages, 1) * tile * elem_size <= _SMEM_LIMIT


def prune_by_shared_memory(configs, named_args, **kwargs):
    """``early_config_prune`` for the autotuners: drop configs whose tiles cannot fit (fp32 operands)."""
    elem_size = named_args["x_ptr"].element_size()
    kept = [c for c in configs if fits_shared_memory(c, elem_size)]
    return kept or configs[-1:]


def launch(name: str, jit_fn, tuned_fn, interpreter_config: triton.Config, grid, *args, **kwargs) -> None:
    """Launch ``jit_fn`` with a forced or the interpreter config, else the autotuned ``tuned_fn``."""
    config = _forced.get(name) or (interpreter_config if interpreting() else None)
    if config is None:
        tuned_fn[grid](*args, **kwargs)
        return
    meta = dict(config.kwargs)
    # The interpreter drops unknown keywords silently; a GPU launch would fail: fail here, everywhere.
    unknown = set(meta) - set(jit_fn.arg_names)
    if unknown:
        raise ValueError(f"config {config} has no parameters {sorted(unknown)} in {jit_fn.__name__}")
    jit_fn[grid(meta)](*args, **kwargs, **meta, num_warps=config.num_warps, num_stages=config.num_stages)


def dot_precision(x: torch.Tensor) -> str:
    """``tl.dot``'s input_precision: TF32 for fp32 only where torch lets cuDNN use it."""
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def flat_k(c_in: int, weight: torch.Tensor) -> bool:
    """Whether to flatten (tap, channel) into one GEMM index: for an image's few channels (the stem's
    3), where padding the channels to a 32-wide block would waste most of the work. With more, the
    per-element tap arithmetic of the flat index costs more than the padding saves."""
    return c_in <= 4 and weight.shape[2] * weight.shape[3] > 1


def nchw_strides(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


# ---- fused loaders ------------------------------------------------------------------------------------


@triton.jit
def load_activation(x_ptr, offs, mask, chan, chan_ok, scale_ptr, shift_ptr,
                    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr):
    """The conv input ``act(x * scale[c] + shift[c])`` at int64 ``offs``, zero where ``mask`` is false
    (``ACT``: an ``_act`` code): in fp32 (as the reference computes it) with a prologue, else as stored,
    so that a plain tile can go straight from global to shared memory. ``chan`` (channel of each element,
    broadcastable to ``offs``) selects scale/shift. The mask is applied again after the affine map and
    activation: ``act(0 * scale + shift)`` is not 0, and the padding must be."""
    a = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_SCALE or HAS_SHIFT or (ACT != NONE and ACT != RELU):
        a = a.to(tl.float32)
        if HAS_SCALE:
            a = a * tl.load(scale_ptr + chan, mask=chan_ok, other=0.0)
        if HAS_SHIFT:
            a = a + tl.load(shift_ptr + chan, mask=chan_ok, other=0.0)
        a = tl.where(mask, act_fwd(a, ACT), 0.0)
    elif ACT == RELU:  # ReLU alone keeps the stored dtype (exact in it)
        a = tl.maximum(a, 0.0)
    return a


@triton.jit
def load_grad(gy_ptr, g_offs, y_ptr, y_offs, mask, chan, chan_ok, mean_ptr, gmean_ptr, gvar_ptr, inv_count,
              G_MODE: tl.constexpr):
    """The conv output gradient ``g`` at int64 ``g_offs``, zero where ``mask`` is false, built while loading
    from what the forward saved: ``G_MODE`` 0: ``grad``; 1: ``grad * (out > 0)`` (``conv_bias_act``'s ReLU,
    ``out`` at ``y_offs``); 2: ``grad_y + grad_mean / M + 2 * grad_var * (y - mean) / M`` (``conv_stats``'
    batch statistics, ``inv_count = 1 / M``, per-channel vectors indexed by ``chan``). Modes 0 and 1 keep
    the stored dtype; mode 2 is computed in fp32, as the reference does."""
    g = tl.load(gy_ptr + g_offs, mask=mask, other=0.0)
    if G_MODE == 1:
        out = tl.load(y_ptr + y_offs, mask=mask, other=0.0)
        g = tl.where(out > 0, g, 0.0).to(g.dtype)
    elif G_MODE == 2:
        g = g.to(tl.float32)
        y = tl.load(y_ptr + y_offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + chan, mask=chan_ok, other=0.0)
        g_mean = tl.load(gmean_ptr + chan, mask=chan_ok, other=0.0)
        g_var = tl.load(gvar_ptr + chan, mask=chan_ok, other=0.0)
        g = tl.where(mask, g + g_mean * inv_count + (2.0 * inv_count) * g_var * (y - mean), 0.0)
    return g


def grad_sources(mode, grad, y, mean, grad_mean, grad_var):
    """The ``load_grad`` arguments after ``dgrad``/``wgrad``'s first two pointers."""
    dummy = grad
    y = y if y is not None else grad
    return (y, mean if mean is not None else dummy, grad_mean if grad_mean is not None else dummy,
            grad_var if grad_var is not None else dummy)

"""How every Triton kernel of this backend sees an activation, and how its launches are tuned.

An activation ``[N, C, H, W]`` with any strides is read as a matrix of ``M = N * H * W`` rows
(pixels) by ``C`` columns (channels): row ``m`` is pixel ``(n, hw) = divmod(m, H * W)``, at
offset ``n * sN + hw * sHW + c * sC``. That one formula covers NCHW (``sHW = 1``) and
channels_last (``sC = 1``) without copies, and every tensor of a kernel carries its own strides,
so inputs and outputs may differ in layout. ``H`` and ``W`` merge into one ``hw`` index when
``sH == W * sW``, true of both standard layouts and of expanded (stride-0) gradients; any other
view is copied once to a standard layout (``mergeable``).

Tiles are ``[BLOCK_M, BLOCK_C]`` (``CL``: channels innermost, for channels_last) or
``[BLOCK_C, BLOCK_M]`` (pixels innermost, for NCHW), so that the unit-stride dimension is the
fastest-varying one of the tile and loads coalesce in both layouts. Row and offset arithmetic is
in int64 from the program id on: ``n * sN`` passes 2**31 long before any tensor is too big.

Autotuning needs a driver: under ``TRITON_INTERPRET=1`` each kernel runs with one fixed config
(large tiles, since the interpreter pays per program and per operation, not per element).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._layout import output_memory_format


@triton.jit
def _probe_kernel():
    pass


# The kernels were built for the interpreter iff TRITON_INTERPRET=1 when triton.jit ran on them.
INTERPRETED = not isinstance(_probe_kernel, triton.runtime.JITFunction)


class _FixedConfig:
    """Stands in for ``triton.autotune`` under the interpreter: launches with one config's meta-args."""

    def __init__(self, fn, config: triton.Config):
        self.fn = fn
        self.meta = dict(config.kwargs)

    def __getitem__(self, grid):
        launch = self.fn[grid]
        return lambda *args, **kwargs: launch(*args, **self.meta, **kwargs)


def tuned(configs: list[triton.Config], key: list[str], interpreter: triton.Config):
    """``triton.autotune(configs, key)`` on a GPU; under the interpreter, the single ``interpreter``
    config. Kernels tuned this way must be idempotent (they overwrite, never accumulate): the
    tuner runs them several times on the real arguments."""

    def wrap(fn):
        if INTERPRETED:
            return _FixedConfig(fn, interpreter)
        return triton.autotune(configs=configs, key=key)(fn)

    return wrap


def tile_configs(shapes, warps=(4, 8)) -> list[triton.Config]:
    """Configs for ``[BLOCK_M, BLOCK_C]`` tiles: every ``(BLOCK_M, BLOCK_C)`` of ``shapes`` with
    each ``num_warps`` of ``warps``."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w) for bm, bc in shapes for w in warps
    ]


# Interpreter tiles: the interpreter costs ~1 ms per operation whatever its size, so few programs
# and few loop steps (numpy does the elements).
INTERPRETER_TILE = triton.Config({"BLOCK_M": 1024, "BLOCK_C": 64})
# The largest BLOCK_M of any config: row chunks are multiples of it.
MAX_BLOCK_M = 256


def device_function(fn):
    """``triton.jit`` for the helpers kernels call. Under the interpreter a jitted helper costs a
    re-patch of ``triton.language`` per call (~7 ms, more than the arithmetic); the interpreter runs
    plain Python anyway, so there the helper stays a plain function (same code, same semantics)."""
    return fn if INTERPRETED else triton.jit(fn)


# --- host side ---------------------------------------------------------------------------------


def mergeable(t: torch.Tensor) -> bool:
    """Whether ``t``'s H and W dimensions can be walked with one ``hw`` index of stride ``sW``."""
    _, _, h, w = t.shape
    return h == 1 or w == 1 or t.stride(2) == w * t.stride(3)


def as_mergeable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself for any standard layout; otherwise one documented copy to a standard layout."""
    return t if mergeable(t) else t.contiguous(memory_format=output_memory_format(t))


def strides(t: torch.Tensor) -> tuple[int, int, int]:
    """``(sN, sC, sHW)`` of a mergeable activation."""
    _, _, h, w = t.shape
    s_hw = t.stride(3) if w > 1 else t.stride(2)
    if h > 1 and w > 1:
        assert t.stride(2) == w * t.stride(3), "activation H/W not mergeable"
    return t.stride(0), t.stride(1), s_hw


def channels_inner(t: torch.Tensor) -> bool:
    """Tile orientation for ``t``: True when its channels are the faster-moving index."""
    _, s_c, s_hw = strides(t)
    return s_c < s_hw or (s_c == s_hw == 1)


def row_chunks(m: int, c: int, device: torch.device) -> tuple[int, int]:
    """``(T, ROWS)``: rows split in ``T`` chunks of ``ROWS`` (a multiple of ``MAX_BLOCK_M``) for the
    kernels that also reduce per channel. On a GPU about four programs per SM (with 64-channel
    blocks), so partial results stay small (``[T, C]`` fp32) while the machine is full."""
    if INTERPRETED or device.type != "cuda":
        rows = 4 * int(INTERPRETER_TILE.kwargs["BLOCK_M"])
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = max(1, (4 * sms) // triton.cdiv(c, 64))
        rows = triton.cdiv(triton.cdiv(m, wanted), MAX_BLOCK_M) * MAX_BLOCK_M
    rows = max(rows, MAX_BLOCK_M)
    return triton.cdiv(m, rows), rows


# --- device side -------------------------------------------------------------------------------


@device_function
def rows_of(row0, M, HW, BLOCK_M: tl.constexpr):
    """Rows ``row0 + [0, BLOCK_M)`` (``row0`` int64) as ``(n, hw, valid)``; valid means ``< M``."""
    m = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    n = m // HW
    return n, m - n * HW, m < M


@device_function
def tile_offsets(n, hw, c, s_n, s_c, s_hw, CL: tl.constexpr):
    """Element offsets (int64) of the tile rows ``(n, hw)`` x channels ``c`` in one tensor."""
    row = n * s_n + hw * s_hw
    col = c.to(tl.int64) * s_c
    if CL:
        off = row[:, None] + col[None, :]
    else:
        off = col[:, None] + row[None, :]
    return off


@device_function
def tile_mask(row_valid, c_valid, CL: tl.constexpr):
    if CL:
        mask = row_valid[:, None] & c_valid[None, :]
    else:
        mask = c_valid[:, None] & row_valid[None, :]
    return mask


@device_function
def per_channel(v, CL: tl.constexpr):
    """A ``[BLOCK_C]`` vector broadcast against the tile."""
    if CL:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


if INTERPRETED:

    def sum_rows(x, CL):
        """Per-channel sum over the tile's rows: ``[BLOCK_C]``. (Interpreter: ``tl.sum`` is itself a
        jitted function, re-patched per call; ``tl.reduce`` with its combiner maps to ``np.sum``.)"""
        return tl.reduce(x, 0 if CL else 1, tl.standard._sum_combine)

else:

    @triton.jit
    def sum_rows(x, CL: tl.constexpr):
        """Per-channel sum over the tile's rows: ``[BLOCK_C]``."""
        if CL:
            out = tl.sum(x, axis=0)
        else:
            out = tl.sum(x, axis=1)
        return out

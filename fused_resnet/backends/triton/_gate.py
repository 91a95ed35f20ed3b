"""``bn_add_relu`` with a per-(sample, channel) gate on the per-channel kernels (``csrc/gate.cpp``'s
scheme, for the Triton backend): the gate folds into per-(sample, channel) vectors ``gate * scale``
and ``gate * shift``; an NCHW tensor runs as ``[1, N*C, H, W]`` (the same memory, one launch; the
residual's vectors tiled N times), channels_last sample by sample (each sample is dense)."""

from __future__ import annotations

import torch


def _per_sample(y: torch.Tensor) -> bool:
    return y.shape[0] > 1 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


def _fold(y, scale, shift, res_scale, res_shift, gate):
    n, c = y.shape[:2]
    sdt = torch.float64 if y.dtype == torch.float64 else torch.float32
    g = gate.reshape(n, c).to(sdt)
    folded = (
        (g * scale if scale is not None else g).reshape(n * c),
        (g * shift).reshape(n * c) if shift is not None else None,
        res_scale.repeat(n) if res_scale is not None else None,
        res_shift.repeat(n) if res_shift is not None else None,
    )
    return g, folded


def _wide(t: torch.Tensor | None) -> torch.Tensor | None:
    # One sample as it is (either layout): made NCHW, a channels_last one was copied and its output came
    # back NCHW, against _layout.py's rule (csrc/gate.cpp likewise).
    if t is None or t.shape[0] == 1:
        return t
    return t.contiguous().view(1, t.shape[0] * t.shape[1], *t.shape[2:])


def _slices(y, residual, folded, i: int):
    c = y.shape[1]
    vectors = [v[i * c:(i + 1) * c] if v is not None else None for v in folded]
    return y[i:i + 1], vectors, residual[i:i + 1] if residual is not None else None


def forward(kernel, y, scale, shift, residual, res_scale, res_shift, act, gate):
    """``kernel`` (the per-channel ``bn_add_relu``) with ``gate`` applied to the BN's output."""
    _, (s, b, rs, rb) = _fold(y, scale, shift, res_scale, res_shift, gate)
    if not _per_sample(y):
        return kernel(_wide(y), s, b, _wide(residual), rs, rb, act).view(y.shape)
    outs = []
    for i in range(y.shape[0]):
        yi, (si, bi, rsi, rbi), ri = _slices(y, residual, (s, b, rs, rb), i)
        outs.append(kernel(yi, si, bi, ri, rsi, rbi, act))
    return torch.cat(outs)


def _cat(parts):
    return None if parts[0] is None else torch.cat(parts)


def backward(kernel, grad_out, y, scale, shift, residual, res_scale, res_shift, act, output_mask, gate):
    """``kernel`` (the per-channel ``bn_add_relu_backward``) for the gated op: its per-(sample,
    channel) sums give the gradients of scale, shift and the gate, the residual's are summed over N."""
    n, c = y.shape[:2]
    g, folded = _fold(y, scale, shift, res_scale, res_shift, gate)
    if not _per_sample(y):
        gy, gsy, gsz, gres, gsr, gsrz = kernel(_wide(grad_out), _wide(y), *folded[:2], _wide(residual), *folded[2:],
                                               act, output_mask)[:6]
        gy = gy.view(y.shape) if gy is not None else None
        gres = gres.view(y.shape) if gres is not None else None
    else:
        parts = []
        for i in range(n):
            yi, (si, bi, rsi, rbi), ri = _slices(y, residual, folded, i)
            parts.append(kernel(grad_out[i:i + 1], yi, si, bi, ri, rsi, rbi, act, output_mask)[:6])
        gy, gsy, gsz, gres, gsr, gsrz = (_cat(list(p)) for p in zip(*parts))
    grad_scale = grad_shift = grad_gate = None
    if output_mask[1]:
        sum_dz_y = gsy.view(n, c)
        sum_dz = gsz.view(n, c) if gsz is not None else None
        grad_scale = (sum_dz_y * g).sum(0) if scale is not None else None
        grad_shift = (sum_dz * g).sum(0) if shift is not None else None
        gg = sum_dz_y * scale if scale is not None else sum_dz_y
        if shift is not None:
            gg = gg + sum_dz * shift
        grad_gate = gg.reshape(gate.shape).to(gate.dtype)
    grad_res_scale = gsr.view(n, c).sum(0) if gsr is not None else None
    grad_res_shift = gsrz.view(n, c).sum(0) if gsrz is not None else None
    return gy, grad_scale, grad_shift, gres, grad_res_scale, grad_res_shift, grad_gate

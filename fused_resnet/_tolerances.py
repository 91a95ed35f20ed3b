"""The one tolerance table: relative L2 error allowed between a result and its reference, by the
dtype the computation ran in. Used by every test and by ``python -m fused_resnet check``."""

from __future__ import annotations

import torch

RELATIVE_L2 = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}
# fp32 convolutions on tensor cores (torch.backends.cuda.matmul/cudnn.allow_tf32) round to 10 bits.
TF32 = 1e-3


def tolerance(dtype: torch.dtype, *, tf32: bool = False) -> float:
    """Allowed relative L2 error for results computed in ``dtype``."""
    if dtype == torch.float32 and tf32:
        return TF32
    return RELATIVE_L2[dtype]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in fp64 (absolute when ``expected`` is all zeros);
    ``inf`` when either holds a NaN or an inf, so that NaN never passes."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return float("inf")
    denominator = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denominator if denominator > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 *, tol: float | None = None, name: str = "result") -> float:
    """Fail unless ``actual`` matches ``expected`` within the table's tolerance for ``dtype``
    (default: ``actual``'s dtype); returns the relative error."""
    limit = tol if tol is not None else tolerance(dtype or actual.dtype)
    err = relative_error(actual, expected)
    if not err <= limit:
        raise AssertionError(f"{name}: relative L2 error {err:.3e} exceeds {limit:.1e}")
    return err

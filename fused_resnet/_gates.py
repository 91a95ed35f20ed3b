"""The per-(sample, channel) gate of a fused residual join (``ops.bn_add_relu(..., gate=)``): timm's
SE between the block's last BN and the add, computed from the deferred BN without writing the BN's
output, and a DropPath's per-sample keep-scale, drawn by the block's own module.

- SE (``_patterns.se_gate_module``): ``se(x) = x * gate(f(mean_hw(x)))`` with ``x = y*scale + shift``
  the BN's output; ``mean_hw(x) = scale * mean_hw(y) + shift`` per (sample, channel), so the pooled
  input needs one read of ``y``; ``f`` and ``gate`` are the SE's own child modules (its parameters
  and hooks stay the model's).
- DropPath: the module applied to ones of shape (N, 1, 1, 1) in the BN output's dtype draws exactly
  what it draws on the real tensor (``x.new_empty((N, 1, 1, 1)).bernoulli_(keep)``, scaled), so the
  random stream and the kept samples are timm's.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from ._layout import stat_dtype


def se_gate(se: nn.Module, h: ops.DeferredBN) -> torch.Tensor:
    """The (N, C, 1, 1) gate timm's ``SEModule`` / ``EffectiveSEModule`` ``se`` multiplies the BN
    output ``h`` by, computed from the deferred BN (``h.y`` is read once)."""
    y, scale, shift = h
    n, c = y.shape[:2]
    pooled = y.mean((2, 3), dtype=stat_dtype(y.dtype))
    if scale is not None:
        pooled = pooled * scale
    if shift is not None:
        pooled = pooled + shift
    x_se = pooled.to(y.dtype).reshape(n, c, 1, 1)  # eager pools the BN output, in its dtype
    m = se._modules
    if "fc" in m:  # EffectiveSEModule: gate(fc(x_se))
        return m["gate"](m["fc"](x_se))
    return m["gate"](m["fc2"](m["act"](m["bn"](m["fc1"](x_se)))))


def drop_keep(drop: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The (N, 1, 1, 1) per-sample factor an active DropPath ``drop`` applies to ``like`` (0 or
    1/keep_prob), drawn by ``drop`` itself."""
    return drop(like.new_ones((like.shape[0], 1, 1, 1)))


def join_gate(h: ops.DeferredBN, se: nn.Module | None, drop: nn.Module | None) -> torch.Tensor | None:
    """The (N, C, 1, 1) gate of ``act(drop(se(bn(y))) + shortcut)`` (either may be None: absent or,
    for ``drop``, inactive), or None when neither applies."""
    gate = se_gate(se, h) if se is not None else None
    if drop is not None:
        keep = drop_keep(drop, h.y)
        gate = keep.expand(h.y.shape[0], h.y.shape[1], 1, 1) if gate is None else gate * keep
    return gate

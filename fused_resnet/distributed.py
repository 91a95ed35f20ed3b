"""Synchronised BatchNorm modules for the fused blocks: which BNs synchronise, over which group,
and :class:`SyncBatchNorm2d`, the ``nn.SyncBatchNorm`` that also runs on the CPU.

The statistics themselves are merged across ranks by ``_sync_stats.py`` (one all-gather of
``2C + 1`` values forward, one all-reduce of ``2C`` backward: its docstring gives the math).
``nn.SyncBatchNorm`` itself only runs on GPUs and DDP refuses it on the CPU, so ``fuse``
turns the SyncBatchNorms it adopts into :class:`SyncBatchNorm2d`: the same module (parameters,
buffers, ``process_group``, ``state_dict``) that also runs on the CPU with gloo.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._layout import channel_view, stat_dtype
from ._sync_stats import merge_batch_stats, update_running_stats_

_CHECKED = "_fused_resnet_sync_checked"  # per-module memo of the cross-rank shape check


# Which modules synchronise, and over which group ----------------------------------------------


def is_sync_batch_norm(bn: nn.Module) -> bool:
    """Whether ``bn`` synchronises its batch statistics: an ``nn.SyncBatchNorm`` or a :class:`SyncBatchNorm2d`
    (also one fused away into a stem conv)."""
    return isinstance(bn, (nn.SyncBatchNorm, SyncBatchNorm2d))


def sync_group(bn: nn.Module, x: torch.Tensor):
    """The process group over which ``bn`` must merge its batch statistics now, or None.

    The conditions are ``nn.SyncBatchNorm.forward``'s: training, ``torch.distributed`` initialised,
    ``bn.process_group`` (else WORLD) of more than one rank. Unlike SyncBatchNorm, which silently
    falls back to per-rank statistics, a ``process_group`` that is not a process group or that this
    rank is not a member of is an error. In eager mode, the first synchronised call of each module
    checks that every rank has the same channel count and statistics dtype (a mismatched
    collective would abort or hang instead of raising); ``x`` is the activation ``bn`` normalises
    (its dtype and device).
    """
    if not (is_sync_batch_norm(bn) and bn.training and dist.is_available() and dist.is_initialized()):
        return None
    group = getattr(bn, "process_group", None)
    group = dist.group.WORLD if group is None else group
    _check_group(group)  # traceable: no graph break
    if dist.get_world_size(group) <= 1:
        return None
    if not torch.compiler.is_compiling():  # a collective and a host sync: eager only
        _check_peers_once(bn, group, stat_dtype(x.dtype), x.device)
    return group


def _check_group(group) -> None:
    # dist.new_group returns a placeholder (not a ProcessGroup) on ranks outside the group.
    if group is dist.GroupMember.NON_GROUP_MEMBER or (
        isinstance(group, dist.ProcessGroup) and dist.distributed_c10d._rank_not_in_group(group)
    ):
        raise RuntimeError(
            f"fused_resnet: global rank {dist.get_rank()} is not a member of the SyncBatchNorm's process_group; "
            "pass a group that contains this rank (dist.new_group must be called on every rank with the same ranks)"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"fused_resnet: SyncBatchNorm.process_group must be a ProcessGroup or None, "
                        f"got {type(group).__name__}")


def _check_peers_once(bn: nn.Module, group, dtype: torch.dtype, device: torch.device) -> None:
    """One small all-gather per module and group: every rank must sync ``num_features`` channels
    in the same dtype, else all ranks raise (they all see the same gathered table)."""
    key = (group.group_name, bn.num_features, dtype)
    if bn.__dict__.get(_CHECKED) == key:
        return
    # On the activations' device: the statistics' own collective will run there too.
    mine = torch.tensor([bn.num_features, torch.finfo(dtype).bits], dtype=torch.int64, device=device)
    table = torch.empty(dist.get_world_size(group) * 2, dtype=torch.int64, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the name in torch < 2.12
    try:
        gather(table, mine, group=group)
    except RuntimeError as e:
        raise RuntimeError(
            f"fused_resnet: the SyncBatchNorm shape check on rank {dist.get_rank(group)} of the process group "
            f"failed ({e}); every rank of the group must run the same model in the same order"
        ) from e
    table = table.view(-1, 2).tolist()
    if any(row != table[0] for row in table):
        rows = ", ".join(f"rank {r}: {c} channels fp{b}" for r, (c, b) in enumerate(table))
        raise RuntimeError(
            f"fused_resnet: SyncBatchNorm layers disagree across the ranks of the process group ({rows}); "
            "every rank must run the same model, with the same channel counts and dtype"
        )
    bn.__dict__[_CHECKED] = key


def _momentum(bn: _BatchNorm) -> float | None:
    # As in nn.BatchNorm2d: momentum=None means a cumulative average, which needs num_batches_tracked.
    return bn.momentum if bn.momentum is not None or bn.num_batches_tracked is not None else 0.0


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.SyncBatchNorm`` for 4-D inputs that also runs on the CPU (gloo) and under DDP there.

    What :func:`fused_resnet.fuse` turns the ``nn.SyncBatchNorm`` modules of the blocks it fuses
    into (in place: parameters, buffers, ``process_group`` and ``state_dict`` are kept). The
    fused blocks read its parameters; called on its own it normalises with
    :func:`merge_batch_stats`' global statistics in training (``nn.SyncBatchNorm.forward``'s
    conditions, see :func:`sync_group`) and is ``nn.BatchNorm2d`` otherwise. It is not an
    ``nn.SyncBatchNorm`` subclass because DDP rejects those on the CPU.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = sync_group(self, x)
        if group is None:
            return super().forward(x)
        self._check_input_dim(x)
        sdt = stat_dtype(x.dtype)
        xs = x.to(sdt)
        var, mean = torch.var_mean(xs, dim=(0, 2, 3), correction=0)
        mean, var, total = merge_batch_stats(mean, var, x.shape[0] * x.shape[2] * x.shape[3], group)
        if self.running_mean is not None and self.running_var is not None:
            update_running_stats_(self.running_mean, self.running_var, self.num_batches_tracked, mean, var, total,
                                  _momentum(self))
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(sdt)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.to(sdt)
        return (xs * channel_view(scale) + channel_view(shift)).to(x.dtype)


class FusedAwaySyncBatchNorm2d(SyncBatchNorm2d):
    """A synchronised BN whose work a preceding fused stem conv does: it passes its input through
    (while the stem is intact: see ``modules.FusedConvBN2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.fused_into.bn_applied() else SyncBatchNorm2d.forward(self, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fused into the preceding conv"


def adopt_sync_batch_norms(module: nn.Module) -> list[str]:
    """Turn, in place, the ``nn.SyncBatchNorm`` modules inside ``module`` into :class:`SyncBatchNorm2d`
    and return their names. ``fuse`` does it for the blocks it fuses; on a whole unfused model it
    lets SyncBatchNorm run on the CPU (gloo, DDP) too, provided every one of them sees 4-D inputs.
    Subclasses of ``nn.SyncBatchNorm`` (their own ``forward``) are left alone."""
    adopted = []
    for name, m in module.named_modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = SyncBatchNorm2d
            adopted.append(name)
    return adopted

"""Synchronised BatchNorm (``nn.SyncBatchNorm`` semantics) for the fused blocks.

With data parallelism every rank holds a slice of the batch; SyncBatchNorm normalises with the
statistics of the whole batch. The fused ``conv_bn`` gets each rank's local per-channel mean and
biased variance from ``conv_stats``; :func:`merge_batch_stats` turns them into the global ones,
differentiably, with one collective in forward and one in backward:

* forward: one all-gather of ``[count, mean (C), M2 (C)]`` per rank (``M2 = count * var``,
  ``2C + 1`` values in the statistics dtype: fp32, fp64 for fp64), then Chan's merge
  ``N = sum n_r``, ``mean = sum n_r mean_r / N``, ``M2 = sum M2_r + sum n_r (mean_r - mean)^2``,
  ``var = M2 / N``. Gathering per-rank *centred* moments rather than all-reducing ``sum`` and
  ``sum of squares`` keeps the variance exact when ``|mean| >> std`` (``E[y^2] - mean^2`` loses
  ``log10(mean^2 / var)`` digits to cancellation) and handles uneven counts, including ranks with
  an empty batch (``n_r = 0`` adds nothing). It is the pattern of ``nn.SyncBatchNorm`` (which
  gathers ``mean, invstd, count``), except that ``M2`` is sent as is instead of being rebuilt from
  ``1 / sqrt(var + eps)``.
* backward: one all-reduce (sum) of ``[grad_mean, grad_var]`` (``2C`` values), the same two
  per-channel reductions ``nn.SyncBatchNorm`` all-reduces; then, with ``G = all-reduced grads``,
  ``grad_mean_r = n_r / N * (G_mean + 2 (mean_r - mean) G_var)`` and
  ``grad_var_r = n_r / N * G_var``. Fed to ``conv_stats``' backward, this gives each rank
  ``grad_y + G_mean / N + 2 G_var (y - mean) / N``: the whole-batch BN gradient.

Traffic per BN layer and step: ``4 (2C + 1)`` bytes sent and ``4 W (2C + 1)`` received forward
(fp32, ``W`` ranks), ``8C`` all-reduced backward, whatever the batch and image size: as
``nn.SyncBatchNorm``. An all-reduce of sums shifted by a common per-channel value would receive
``O(C)`` instead of ``O(W C)``, but no common shift is known without another collective.

The collectives are ``torch.distributed._functional_collectives`` ops, which ``torch.compile``
traces into the graph (no graph break, ``fullgraph=True`` works). The running statistics are
updated with the global mean and the unbiased variance over the global count, as SyncBatchNorm
does. ``nn.SyncBatchNorm`` itself only runs on GPUs and DDP refuses it on the CPU, so ``fuse``
turns the SyncBatchNorms it adopts into :class:`SyncBatchNorm2d`: the same module (parameters,
buffers, ``process_group``, ``state_dict``) that also runs on the CPU with gloo.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import reference
from ._layout import channel_view, stat_dtype

_CHECKED = "_fused_resnet_sync_checked"  # per-module memo of the cross-rank shape check


def _funcol():
    import torch.distributed._functional_collectives as funcol

    return funcol


def _gather(t: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0, as a traceable functional collective (a graph node under compile)."""
    funcol = _funcol()
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # the name in torch < 2.12
    return funcol.wait_tensor(gather(t, 0, group))


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    funcol = _funcol()
    return funcol.wait_tensor(funcol.all_reduce(t, "sum", group))


class _MergeBatchStats(torch.autograd.Function):
    """Local ``(mean, biased var, count)`` -> global ``(mean, biased var, count)``; see the module
    docstring for the merge and its gradient."""

    @staticmethod
    def forward(ctx, mean, var, count, group):
        if count == 0:
            # An empty local batch gives NaN statistics; with n_r = 0 they must not poison the merge.
            mean, var = torch.zeros_like(mean), torch.zeros_like(var)
        channels = mean.shape[0]
        local = torch.cat([mean.new_full((1,), count), mean, var * count])
        gathered = _gather(local, group).view(-1, 2 * channels + 1)
        counts, means, m2s = gathered[:, :1], gathered[:, 1:channels + 1], gathered[:, channels + 1:]
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total
        global_var = (m2s.sum(0) + (counts * (means - global_mean) ** 2).sum(0)) / total
        ctx.save_for_backward(mean, global_mean, total)
        ctx.count, ctx.group = count, group
        ctx.mark_non_differentiable(total)
        return global_mean, global_var, total

    @staticmethod
    def backward(ctx, grad_mean, grad_var, _grad_total):
        mean, global_mean, total = ctx.saved_tensors
        channels = mean.shape[0]
        # Every rank joins this all-reduce, also with an empty batch: a peer would wait otherwise.
        reduced = _all_reduce_sum(torch.cat([grad_mean, grad_var]), ctx.group)
        g_mean, g_var = reduced[:channels], reduced[channels:]
        weight = ctx.count / total
        return weight * (g_mean + 2.0 * (mean - global_mean) * g_var), weight * g_var, None, None


def merge_batch_stats(mean: torch.Tensor, var: torch.Tensor, count: int, group):
    """The whole-batch ``(mean, biased var, count)`` over the ranks of ``group`` from this rank's
    per-channel ``mean``/``var`` (fp32, or fp64) of ``count`` values per channel; differentiable
    (one all-gather forward, one all-reduce backward). ``count`` comes back as a 0-d tensor."""
    return _MergeBatchStats.apply(mean, var, count, group)


@torch.no_grad()
def update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var, total, momentum):
    """``update_running_stats_`` (see ``reference.py``) with the global count as a tensor, so that
    no host sync is needed: ``running_var`` gets ``var * N / (N - 1)``. Computed in fp64."""
    reference.update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var, total.double(),
                                    momentum)


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
        return x if self.fused_into.fused_state()[0] else SyncBatchNorm2d.forward(self, x)

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

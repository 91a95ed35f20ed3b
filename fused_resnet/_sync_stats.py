"""Whole-batch BatchNorm statistics across ranks (``nn.SyncBatchNorm`` semantics) for the fused ops.

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
does.
"""

from __future__ import annotations

import torch

from . import reference


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

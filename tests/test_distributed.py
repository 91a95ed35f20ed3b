"""Synchronised BatchNorm in fused blocks: two CPU processes (gloo), each holding part of a batch,
must compute what one process computes with the unfused ``nn`` model on the whole batch.

All scenarios run in ONE pair of spawned processes (starting processes dominates the cost on a
small machine); each records "ok" or its failure, and each pytest test below reads its own. The
processes are killed at a deadline and gloo has a short timeout, so a bug fails, never hangs.
With two GPUs the training comparisons also run on CUDA with NCCL (``test_nccl``, skipped otherwise).
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fused_resnet
from fused_resnet import _sync_stats as sync_stats
from fused_resnet import distributed as fdist
from fused_resnet import models
from fused_resnet._tolerances import assert_close, tolerance

WORLD = 2
GLOO_TIMEOUT_S = 30
DEADLINE_S = 240


# The model: a torchvision ResNet cut down to a stem, a BasicBlock and a strided Bottleneck with a
# downsample, at 16x16 input (2x2 in the last block), so fp64 runs in milliseconds.


def _tiny_resnet(dtype: torch.dtype) -> nn.Module:
    model = models.ResNet(models.BasicBlock, [1, 1, 1, 1], num_classes=5)
    downsample = nn.Sequential(models.conv1x1(64, 128, 2), nn.BatchNorm2d(128))
    model.layer2 = nn.Sequential(models.Bottleneck(64, 32, stride=2, downsample=downsample))
    model.layer3 = model.layer4 = nn.Identity()
    model.fc = nn.Linear(128, 5)
    for m in model.modules():  # random affine parameters and running statistics: nothing trivially 0 or 1
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.to(dtype)


def _tiny_block(dtype: torch.dtype) -> nn.Module:
    """One strided Bottleneck with a downsample: the smallest model with every kind of fused BN."""
    downsample = nn.Sequential(models.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    model = nn.Sequential(models.Bottleneck(8, 4, stride=2, downsample=downsample), nn.Flatten(), nn.Linear(144, 5))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.to(dtype)


def _sync_fused(plain: nn.Module, group=None) -> nn.Module:
    model = fused_resnet.fuse(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain), group))
    leftover = [n for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    assert not leftover, f"fuse left nn.SyncBatchNorm modules (DDP refuses them on the CPU): {leftover}"
    assert any(isinstance(m, (fused_resnet.FusedBasicBlock, fused_resnet.FusedBottleneck)) for m in model.modules())
    assert all(not isinstance(m, nn.BatchNorm2d) or isinstance(m, fdist.SyncBatchNorm2d) for m in model.modules())
    return model


def _split(t: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    return t.split(sizes)[rank]


class _Counting:
    """Counts the collectives of ``fused_resnet._sync_stats`` (forward gathers, backward reductions)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __enter__(self):
        self.gathers = self.reduces = 0
        self._g, self._r = sync_stats._gather, sync_stats._all_reduce_sum
        if not self.enabled:
            return self

        self.groups = set()

        def gather(t, group):
            self.gathers += 1
            self.groups.add(group)
            return self._g(t, group)

        def reduce(t, group):
            self.reduces += 1
            self.groups.add(group)
            return self._r(t, group)

        sync_stats._gather, sync_stats._all_reduce_sum = gather, reduce
        return self

    def __exit__(self, *exc):
        sync_stats._gather, sync_stats._all_reduce_sum = self._g, self._r


def _compare_training(rank, sizes, dtype, *, memory_format=torch.contiguous_format, compile_=False, steps=2,
                      own_group=False, device="cpu", biased=False):
    """DDP(fused synchronised model) on this rank's slice vs the unfused model on the whole batch:
    outputs, every gradient after DDP's averaging (per-rank loss scaled by the world size, so the
    average is the whole batch's gradient), and all buffers after ``steps`` training steps.
    ``compile_``: DDP around ``torch.compile(fullgraph=True)`` of a single fused block (compiling
    the whole tiny ResNet takes minutes on a busy 2-core machine; one block has every BN kind).
    ``own_group``: the SyncBatchNorms get a process group of their own, which must be the one used.
    ``biased``: every conv given a bias (absorbed by its synchronised BN; ``ops.conv_bn``)."""
    group = dist.new_group([0, 1]) if own_group else None
    device = torch.device(device)
    torch.manual_seed(1)
    plain = (_tiny_block if compile_ else _tiny_resnet)(dtype).to(device, memory_format=memory_format)
    if biased:
        for m in plain.modules():
            if isinstance(m, nn.Conv2d):
                m.bias = nn.Parameter(torch.empty(m.out_channels, dtype=dtype, device=device).uniform_(-1.0, 1.0))
    biases = {f"{n}.bias" for n, m in plain.named_modules() if isinstance(m, nn.Conv2d) and m.bias is not None}
    fused = _sync_fused(plain, group)
    n_sync = sum(isinstance(m, fdist.SyncBatchNorm2d) for m in fused.modules())
    ddp = DDP(torch.compile(fused, fullgraph=True, backend="aot_eager") if compile_ else fused,
              device_ids=[device.index] if device.type == "cuda" else None)
    shape = (8, 6, 6) if compile_ else (3, 16, 16)
    tol = tolerance(dtype, tf32=device.type == "cuda")
    for step in range(steps):
        x = torch.randn(sum(sizes), *shape, dtype=dtype).to(device, memory_format=memory_format)
        w = torch.randn(sum(sizes), 5, dtype=dtype).to(device)
        out_ref = plain(x)
        (out_ref * w).sum().backward()
        with _Counting(enabled=not compile_) as counted, fused_resnet.trace_dispatch() as ran:
            out = ddp(_split(x, sizes, rank))
            (out * _split(w, sizes, rank)).sum().mul(WORLD).backward()
        assert_close(out, _split(out_ref, sizes, rank), tol=tol, name=f"step {step} output")
        top = max(p.grad.norm() for p in plain.parameters())
        for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
            if name in biases:  # zero in exact arithmetic (the BN's batch mean takes the bias away)
                assert q.grad is not None and not q.grad.any() and p.grad.norm() <= 1e-9 * top, name
                continue
            assert_close(q.grad, p.grad, tol=tol, name=f"step {step} grad {name}")
        if not compile_:  # one all-gather per BN forward, one all-reduce per BN backward
            assert (counted.gathers, counted.reduces) == (n_sync, n_sync), (counted.gathers, counted.reduces, n_sync)
            assert counted.groups == {group or dist.group.WORLD}, counted.groups
            # ... and every synchronised BN ran fused, in a conv_stats op (not in SyncBatchNorm2d.forward).
            assert sum(kernel == "conv_stats" for kernel, _ in ran) == n_sync, ran
        plain.zero_grad(), fused.zero_grad()
    for (name, b), c in zip(plain.named_buffers(), fused.buffers()):
        assert_close(c, b, tol=tol, name=f"buffer {name}")
    # Eval uses the (synchronised) running statistics, with no collective.
    plain.eval(), fused.eval()
    x = torch.randn(3, *shape, dtype=dtype).to(device)
    with _Counting() as counted, torch.no_grad():
        assert_close(fused(x), plain(x), tol=tol, name="eval output")
    assert counted.gathers == counted.reduces == 0


def _standalone_sync_bn(rank, sizes, dtype):
    """``SyncBatchNorm2d`` on its own (the eager fallback of a block) vs ``nn.BatchNorm2d`` on the batch."""
    torch.manual_seed(2)
    ref = nn.BatchNorm2d(6, momentum=None).to(dtype)
    nn.init.uniform_(ref.weight, 0.5, 1.5), nn.init.uniform_(ref.bias, -0.5, 0.5)
    bn = copy.deepcopy(ref)
    bn.__class__ = fdist.SyncBatchNorm2d
    x = (torch.randn(sum(sizes), 6, 5, 3, dtype=dtype) * 3 + 2).requires_grad_()
    g = torch.randn_like(x)
    out_ref = ref(x)
    (out_ref * g).sum().backward()
    xr = _split(x.detach(), sizes, rank).requires_grad_()
    out = bn(xr)
    (out * _split(g, sizes, rank)).sum().backward()
    tol = tolerance(dtype)
    assert_close(out, _split(out_ref, sizes, rank), tol=tol, name="output")
    assert_close(xr.grad, _split(x.grad, sizes, rank), tol=tol, name="grad input")
    for name in ("weight", "bias"):  # parameter gradients are per-rank partial sums until DDP reduces them
        total = getattr(bn, name).grad.clone()
        dist.all_reduce(total)
        assert_close(total, getattr(ref, name).grad, tol=tol, name=f"grad {name}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(bn, name), getattr(ref, name), tol=tol, name=name)


def _deferred_bn(rank, sizes, dtype):
    """``ops.batch_norm_deferred`` with a process group (a pre-activation block's norm1): the whole
    batch's statistics, as ``nn.BatchNorm2d`` on the whole batch (output, input gradient, running stats)."""
    torch.manual_seed(4)
    ref = nn.BatchNorm2d(6, momentum=None).to(dtype)
    nn.init.uniform_(ref.weight, 0.5, 1.5), nn.init.uniform_(ref.bias, -0.5, 0.5)
    bn = copy.deepcopy(ref)
    x = (torch.randn(sum(sizes), 6, 5, 3, dtype=dtype) * 3 + 2).requires_grad_()
    g = torch.randn_like(x)
    out_ref = ref(x)
    (out_ref * g).sum().backward()
    xr = _split(x.detach(), sizes, rank).requires_grad_()
    d = fused_resnet.ops.batch_norm_deferred(xr, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                             bn.num_batches_tracked, momentum=None, eps=bn.eps,
                                             process_group=dist.group.WORLD)
    out = d.y * d.scale.view(-1, 1, 1) + d.shift.view(-1, 1, 1)
    (out * _split(g, sizes, rank)).sum().backward()
    tol = tolerance(dtype)
    assert_close(out, _split(out_ref, sizes, rank), tol=tol, name="output")
    assert_close(xr.grad, _split(x.grad, sizes, rank), tol=tol, name="grad input")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(bn, name), getattr(ref, name), tol=tol, name=name)


def _large_mean_merge(rank, sizes, dtype):
    """fp32 statistics of data with |mean| = 1e4 * std: the merge keeps the variance exact, where
    an all-reduce of sum and sum of squares would lose ~8 digits of it."""
    torch.manual_seed(3)
    full = torch.randn(sum(sizes), 4, 7, 5, dtype=torch.float64) + 1e4
    local = _split(full, sizes, rank).float()
    var, mean = torch.var_mean(local, dim=(0, 2, 3), correction=0)
    g_mean, g_var, total = fdist.merge_batch_stats(mean, var, local.numel() // 4, dist.group.WORLD)
    ref_var, ref_mean = torch.var_mean(full.float().double(), dim=(0, 2, 3), correction=0)
    assert_close(g_mean, ref_mean, torch.float32, name="mean")
    assert_close(g_var, ref_var, tol=1e-4, name="var")  # fp32 rounding of the inputs themselves (1e4 * 6e-8)
    assert int(total) == full.numel() // 4


def _channel_mismatch(rank, sizes, dtype, device="cpu"):
    bn = fdist.SyncBatchNorm2d(4 + 2 * rank, device=device)
    with pytest.raises(RuntimeError, match="disagree across the ranks"):
        bn(torch.randn(2, 4 + 2 * rank, 3, 3, device=device))


def _fused_channel_mismatch(rank, sizes, dtype):
    width = 4 + 2 * rank
    block = _sync_fused(nn.Sequential(models.BasicBlock(width, width)))
    with pytest.raises(RuntimeError, match="disagree across the ranks"):
        block(torch.randn(2, width, 3, 3))


def _absent_peer(rank, sizes, dtype):
    """A rank that never joins: the others fail with a clear error once the group's timeout passes."""
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=2))
    if rank == 1:
        time.sleep(4)  # not taking part; rank 0 must raise, not wait forever
        return
    bn = fdist.SyncBatchNorm2d(4, process_group=group)
    with pytest.raises(RuntimeError, match="shape check on rank 0 of the process group failed"):
        bn(torch.randn(2, 4, 3, 3))


def _bad_group_type(rank, sizes, dtype):
    bn = fdist.SyncBatchNorm2d(4, process_group="world")
    with pytest.raises(TypeError, match="process_group must be a ProcessGroup"):
        bn(torch.randn(2, 4, 3, 3))


def _not_a_member(rank, sizes, dtype):
    group = dist.new_group([0])  # every rank must call new_group; rank 1 is not in it
    bn = fdist.SyncBatchNorm2d(4, process_group=group)
    x = torch.randn(2, 4, 3, 3)
    if rank == 0:  # a group of one: no synchronisation, plain BatchNorm2d
        assert_close(bn(x), nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True), name="out")
    else:
        with pytest.raises(RuntimeError, match="not a member"):
            bn(x)


SCENARIOS = {
    "fp64_even": lambda r: _compare_training(r, [2, 2], torch.float64),
    "fp64_uneven_own_group": lambda r: _compare_training(r, [3, 1], torch.float64, own_group=True),
    "fp64_empty_rank": lambda r: _compare_training(r, [3, 0], torch.float64, steps=1),
    "fp64_biased_convs": lambda r: _compare_training(r, [3, 2], torch.float64, biased=True),
    "fp32_uneven_channels_last": lambda r: _compare_training(r, [1, 2], torch.float32,
                                                             memory_format=torch.channels_last),
    "fp32_compile_own_group": lambda r: _compare_training(r, [2, 1], torch.float32, compile_=True, steps=1,
                                                          own_group=True),
    "standalone_fp64": lambda r: _standalone_sync_bn(r, [5, 2], torch.float64),
    "large_mean": lambda r: _large_mean_merge(r, [3, 2], torch.float32),
    "deferred_bn_fp64": lambda r: _deferred_bn(r, [3, 2], torch.float64),
    "channel_mismatch": lambda r: _channel_mismatch(r, None, None),
    "bad_group_type": lambda r: _bad_group_type(r, None, None),
    "not_a_member": lambda r: _not_a_member(r, None, None),
    "fused_channel_mismatch": lambda r: _fused_channel_mismatch(r, None, None),
    "absent_peer": lambda r: _absent_peer(r, None, None),  # last: it leaves its group unusable
}


# With two GPUs (NCCL): the same comparisons on CUDA (fp32 within the TF32 tolerance).
CUDA_SCENARIOS = {
    "cuda_fp64_uneven": lambda r: _compare_training(r, [3, 1], torch.float64, device=f"cuda:{r}"),
    "cuda_fp32_channels_last": lambda r: _compare_training(r, [2, 3], torch.float32, device=f"cuda:{r}",
                                                           memory_format=torch.channels_last),
    "cuda_channel_mismatch": lambda r: _channel_mismatch(r, None, None, device=f"cuda:{r}"),
}


def _worker(rank: int, port: int, out_dir: str, backend: str) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    results = {}
    for name, scenario in (CUDA_SCENARIOS if backend == "nccl" else SCENARIOS).items():
        start = time.perf_counter()
        try:
            scenario(rank)
            results[name] = "ok"
        except BaseException:  # noqa: BLE001  (recorded and reported by the test for this scenario)
            results[name] = traceback.format_exc()
        if os.environ.get("FUSED_RESNET_TIME_SCENARIOS"):
            print(f"rank {rank} {name}: {time.perf_counter() - start:.1f}s", flush=True)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out_dir: str, backend: str) -> list[dict[str, str]]:
    args = (_free_port(), out_dir, backend)
    ctx = mp.start_processes(_worker, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {backend} workers did not finish within {DEADLINE_S}s (a hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def _check(results_per_rank: list[dict[str, str]], scenario: str) -> None:
    for rank, results in enumerate(results_per_rank):
        outcome = results.get(scenario, "not run (an earlier scenario aborted the worker)")
        assert outcome == "ok", f"rank {rank}:\n{outcome}"


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with gloo is required")
    return _run_workers(str(tmp_path_factory.mktemp("gloo")), "gloo")


@pytest.fixture(scope="module")
def nccl_results(tmp_path_factory):
    if torch.cuda.device_count() < WORLD or not dist.is_nccl_available():
        pytest.skip(f"needs {WORLD} CUDA GPUs and NCCL")
    return _run_workers(str(tmp_path_factory.mktemp("nccl")), "nccl")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_gloo(gloo_results, scenario):
    _check(gloo_results, scenario)


@pytest.mark.cuda
@pytest.mark.parametrize("scenario", list(CUDA_SCENARIOS))
def test_nccl(nccl_results, scenario):
    _check(nccl_results, scenario)


def test_single_process_is_batch_norm():
    """Without an initialised process group, synchronised BNs (fused or not) are BatchNorm2d."""
    assert not dist.is_initialized()
    torch.manual_seed(0)
    plain = _tiny_resnet(torch.float64)
    fused = _sync_fused(plain)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert_close(fused(x), plain(x), name="output")
    for (name, b), c in zip(plain.named_buffers(), fused.buffers()):
        assert_close(c, b, tol=tolerance(torch.float64), name=f"buffer {name}")

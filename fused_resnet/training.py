"""The classic ResNet training loop (cross-entropy, SGD with momentum and weight decay, cosine
learning rate, per-epoch loss and test accuracy), used by ``python -m fused_resnet train``.

Everything random is drawn from the seed: the initial weights (``torch.manual_seed`` before the
model is built), the data order (``DistributedSampler(seed=...)``, also with one process) and the
augmentation (a ``torch.Generator``). Two runs with one seed therefore see the same weights and
the same batches, which is what ``--compare`` relies on to set the fused model beside the ``nn``
one. Under ``torchrun`` each process trains on its shard, gradients are averaged by
``DistributedDataParallel``, ``batch_size`` is per process, and metrics are summed over processes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from . import _torchrun, models
from ._backend import use_backend
from .data import ImageDataset, collate_batch, random_crop_flip
from .distributed import adopt_sync_batch_norms
from .fuse import find_fusable, fuse
from .inference import prepare_for_inference
from .small_resnet import small_resnet

MODELS = ("small", "resnet18", "resnet34", "resnet50")


@dataclass
class TrainConfig:
    dataset: str = "digits"
    model: str = "small"
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    image_size: int = 16
    augment: bool = False
    seed: int = 0
    backend: str = "auto"
    dtype: str = "fp32"
    channels_last: bool = False
    sync_bn: bool = False
    init_from: str | None = None
    progress: bool = True


@dataclass
class History:
    """Per-epoch metrics (means over the whole epoch and all processes) and the main process's
    per-step training losses."""

    fused: bool
    epoch_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    images_per_s: list[float] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def build_model(name: str, num_classes: int) -> nn.Module:
    """An unfused model (``fuse`` comes later, after checkpoint loading and SyncBatchNorm)."""
    if name == "small":
        return small_resnet(fused=False, num_classes=num_classes)
    if name in MODELS:
        return getattr(models, name)(fused=False, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def load_checkpoint(model: nn.Module, path: str) -> str:
    """Load a torchvision-format ``state_dict`` (plain, or under ``state_dict``/``model``, keys
    possibly prefixed ``module.``) into ``model``. When the classifier's shape differs (another
    class count) the checkpoint's ``fc`` is dropped and the model keeps its fresh one. Returns a
    one-line summary; raises ``ValueError`` naming the keys that do not match."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise TypeError(f"{path}: expected a state_dict (a dict of tensors), found {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    replaced = [k for k in ("fc.weight", "fc.bias") if k in state and k in own and state[k].shape != own[k].shape]
    note = ""
    if replaced:
        note = f"; classifier replaced ({state['fc.weight'].shape[0]} -> {own['fc.weight'].shape[0]} classes)"
        for k in replaced:
            del state[k]
    missing = [k for k in own if k not in state and k not in replaced]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{path} does not fit the model: {len(missing)} missing keys {missing[:4]}, "
                         f"{len(unexpected)} unexpected {unexpected[:4]}, {len(mismatched)} of another shape "
                         f"{mismatched[:4]}")
    model.load_state_dict(state, strict=False)
    return f"loaded {len(state)} tensors from {path}{note}"


def prepare_model(config: TrainConfig, num_classes: int, fused: bool, place: _torchrun.Place,
                  log: Callable[[str], None] = print) -> nn.Module:
    """Seeded initial weights, then the checkpoint, SyncBatchNorm, ``fuse``, device/layout and DDP,
    in that order (SyncBatchNorm must exist before ``fuse`` decides what it can swap)."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, num_classes)
    if config.init_from:
        log(load_checkpoint(model, config.init_from))
    if config.sync_bn and place.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if place.device.type == "cpu":
            # DDP refuses nn.SyncBatchNorm on the CPU; SyncBatchNorm2d is the same module that runs there
            # (every norm of these models sees 4-D inputs), so the unfused --compare model trains too.
            adopt_sync_batch_norms(model)
    if fused:
        fuse(model)
        left = find_fusable(model)
        log(f"fused model: {_count_fused(model)} fused blocks/stems" + (f"; not fused: {left}" if left else ""))
    model = model.to(place.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if place.distributed:
        ids = [place.device.index] if place.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def _count_fused(model: nn.Module) -> int:
    from .modules import FusedBasicBlock, FusedBottleneck, FusedConvBN2d

    return sum(isinstance(m, (FusedBasicBlock, FusedBottleneck, FusedConvBN2d)) for m in model.modules())


def _autocast(config: TrainConfig, device: torch.device):
    if config.dtype == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[config.dtype]
    return torch.autocast(device.type, dtype=dtype)


def _progress(iterable, place, config, **kwargs):
    if not (config.progress and place.is_main):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)


def evaluate(model: nn.Module, test: ImageDataset, config: TrainConfig,
             place: _torchrun.Place) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on the test set (each process takes every world-th image).
    A fused model is prepared for serving (BN folded once); the next ``model.train()`` undoes it."""
    prepare_for_inference(model)
    shard = list(range(place.rank, len(test), place.world_size))
    loader = DataLoader(test, batch_size=max(config.batch_size, 256), sampler=shard, collate_fn=collate_batch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=place.device)
    correct = torch.zeros((), dtype=torch.float64, device=place.device)
    with torch.no_grad(), _autocast(config, place.device):
        for x, y in loader:
            x, y = _to_device(x, y, config, place)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum().double()
    loss_sum, correct = _torchrun.sum_across(place, loss_sum.item(), correct.item())
    return loss_sum / len(test), correct / len(test)


def _to_device(x, y, config, place):
    x = x.to(place.device, non_blocking=True)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(place.device, non_blocking=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: torch.Tensor,
          y: torch.Tensor, config: TrainConfig, place: _torchrun.Place) -> torch.Tensor:
    """One training step on ``(x, y)`` (forward under the config's autocast, cross-entropy, backward through
    the loss scaler, optimizer step); returns the loss."""
    with _autocast(config, place.device):
        loss = F.cross_entropy(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


def train(model: nn.Module, train_set: ImageDataset, test_set: ImageDataset, config: TrainConfig,
          place: _torchrun.Place, *, fused: bool, log: Callable[[str], None] = print) -> History:
    """Train ``model`` (prepared by :func:`prepare_model`) for ``config.epochs`` epochs."""
    history = History(fused=fused)
    sampler = DistributedSampler(train_set, num_replicas=place.world_size, rank=place.rank, shuffle=True,
                                 seed=config.seed)
    loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, collate_fn=collate_batch)
    augment_rng = torch.Generator().manual_seed(config.seed * 1_000_003 + place.rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    # Cosine annealing per step, as the classic tutorial does per epoch: smoother for few epochs.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * len(loader)))
    # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none.
    scaler = torch.amp.GradScaler(place.device.type, enabled=config.dtype == "fp16")
    start = time.perf_counter()
    with use_backend(config.backend):
        for epoch in range(config.epochs):
            sampler.set_epoch(epoch)
            model.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=place.device)
            step_losses, seen = [], 0
            _sync(place.device)
            epoch_start = time.perf_counter()
            bar = _progress(loader, place, config, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch")
            for x, y in bar:
                if config.augment:
                    x = random_crop_flip(x, 4, augment_rng)
                x, y = _to_device(x, y, config, place)
                loss = _step(model, optimizer, scaler, x, y, config, place)
                schedule.step()
                step_losses.append(loss.detach())
                loss_sum += loss.detach().double() * y.shape[0]
                seen += y.shape[0]
                if bar is not loader and len(step_losses) % 8 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen / (time.perf_counter() - epoch_start):.0f}")
            _sync(place.device)
            elapsed = time.perf_counter() - epoch_start
            total_loss, total_seen, total_rate = _torchrun.sum_across(
                place, loss_sum.item(), float(seen), seen / elapsed)
            test_loss, accuracy = evaluate(model, test_set, config, place)
            history.epoch_loss.append(total_loss / total_seen)
            history.test_loss.append(test_loss)
            history.test_accuracy.append(accuracy)
            history.images_per_s.append(total_rate)
            history.step_loss.extend(torch.stack(step_losses).float().tolist())
            if not math.isfinite(history.epoch_loss[-1]):
                raise FloatingPointError(f"training diverged at epoch {epoch + 1}: loss {history.epoch_loss[-1]}")
            log(f"epoch {epoch + 1:>3}/{config.epochs}  loss {history.epoch_loss[-1]:.4f}  "
                f"test loss {test_loss:.4f}  test acc {100 * accuracy:6.2f}%  {total_rate:,.0f} img/s")
    history.seconds = time.perf_counter() - start
    return history


def interleaved_step_ms(models: list[nn.Module], train_set: ImageDataset, config: TrainConfig,
                        place: _torchrun.Place, rounds: int = 9, steps: int = 4) -> list[float]:
    """Milliseconds of one training step (forward, loss, backward, SGD step, as :func:`train` runs
    them) of each model on one batch of ``train_set``, best of ``rounds`` rounds of ``steps`` steps in
    which the models take turns: a speed comparison that the machine's drift does not bias, unlike
    the per-epoch images/s of two trainings run one after the other. Each model is timed on a deep
    copy (the models themselves are left as trained)."""
    x, y = _to_device(*train_set.__getitems__(list(range(min(config.batch_size, len(train_set))))), config, place)
    runs = []
    for model in models:
        copy_ = copy.deepcopy(unwrap(model)).train()
        optimizer = torch.optim.SGD(copy_.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        scaler = torch.amp.GradScaler(place.device.type, enabled=config.dtype == "fp16")

        runs.append(functools.partial(_step, copy_, optimizer, scaler, x, y, config, place))
    best = [math.inf] * len(runs)
    with use_backend(config.backend):
        for step in runs:  # warm-up: allocator, oneDNN's primitive caches
            step()
            step()
        for _ in range(rounds):
            for i, step in enumerate(runs):
                _sync(place.device)
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                _sync(place.device)
                best[i] = min(best[i], (time.perf_counter() - start) / steps * 1e3)
    return best


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def initial_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of ``model``'s weights and buffers, to start a second model from the same point."""
    return copy.deepcopy(unwrap(model).state_dict())

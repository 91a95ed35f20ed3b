"""What is benchmarked: one block of each ResNet stage shape and whole ResNet-18/50, each run by
every variant (eager NCHW, eager channels_last, ``torch.compile``, fused with each backend) on the
same inputs in the same dtype (bf16 autocast on CUDA, fp32 on the CPU).

Sizes are the real ones on CUDA (224x224 images, batch 256) and scaled down on the CPU (56x56
images, batch 4, so each stage runs at a quarter of its real resolution) to keep the CPU suite to
a few minutes. Every case builds its module from a seeded generator, so each variant gets the
same weights and inputs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from .._backend import backends, use_backend
from ..fuse import fuse
from ..inference import prepare_for_inference


@dataclass(frozen=True)
class BlockShape:
    """One residual block as it sits in a torchvision ResNet at 224x224 input."""

    name: str
    kind: str  # "basic" | "bottleneck"
    inplanes: int
    planes: int
    stride: int
    size: int  # input height = width at 224x224

    @property
    def downsample(self) -> bool:
        expansion = 4 if self.kind == "bottleneck" else 1
        return self.stride != 1 or self.inplanes != self.planes * expansion


# The first block of each stage (downsample) and the ones after it (identity shortcut).
BLOCKS = (
    BlockShape("basic-l1", "basic", 64, 64, 1, 56),
    BlockShape("basic-l2.0-ds", "basic", 64, 128, 2, 56),
    BlockShape("basic-l2", "basic", 128, 128, 1, 28),
    BlockShape("basic-l3.0-ds", "basic", 128, 256, 2, 28),
    BlockShape("basic-l3", "basic", 256, 256, 1, 14),
    BlockShape("basic-l4.0-ds", "basic", 256, 512, 2, 14),
    BlockShape("basic-l4", "basic", 512, 512, 1, 7),
    BlockShape("bottleneck-l1.0-ds", "bottleneck", 64, 64, 1, 56),
    BlockShape("bottleneck-l1", "bottleneck", 256, 64, 1, 56),
    BlockShape("bottleneck-l2.0-ds", "bottleneck", 256, 128, 2, 56),
    BlockShape("bottleneck-l2", "bottleneck", 512, 128, 1, 28),
    BlockShape("bottleneck-l3.0-ds", "bottleneck", 512, 256, 2, 28),
    BlockShape("bottleneck-l3", "bottleneck", 1024, 256, 1, 14),
    BlockShape("bottleneck-l4.0-ds", "bottleneck", 1024, 512, 2, 14),
    BlockShape("bottleneck-l4", "bottleneck", 2048, 512, 1, 7),
)
MODELS = ("resnet18", "resnet50")
MODES = ("eval", "train")  # eval: forward, no grad; train: forward + backward (+ SGD step for models)


@dataclass(frozen=True)
class Sizes:
    batch: int
    image: int  # model input size; block inputs scale with it (56 at 224)
    dtype: torch.dtype  # autocast dtype, or fp32 for no autocast

    def block_size(self, shape: BlockShape) -> int:
        return max(1, -(-shape.size * self.image // 224))


def default_sizes(device_type: str, batch: int | None = None, image: int | None = None,
                  dtype: torch.dtype | None = None) -> Sizes:
    cuda = device_type == "cuda"
    return Sizes(batch or (256 if cuda else 4), image or (224 if cuda else 56),
                 dtype or (torch.bfloat16 if cuda else torch.float32))


@dataclass(frozen=True)
class Variant:
    name: str
    fused: bool
    channels_last: bool
    compile_mode: str | None = None
    backend: str | None = None


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value not in ("", "0", "false", "no")


def variants(device_type: str) -> list[Variant]:
    """Every variant to run on ``device_type``; the fused ones, one per available backend
    (Triton on the CPU only runs under its interpreter, far too slow to time: left out)."""
    out = [Variant("eager", False, False), Variant("eager_cl", False, True), Variant("compile", False, True, "default")]
    if device_type == "cuda" and _env_flag("FUSED_RESNET_BENCH_MAX_AUTOTUNE", False):
        out.append(Variant("compile_max_autotune", False, True, "max-autotune"))
    for backend in backends(device_type):
        if backend == "triton" and device_type != "cuda":
            continue
        out.append(Variant(f"fused_{backend}", True, True, backend=backend))
    return out


# torch.compile on the CPU compiles C++ for each case (10-40 s each): the CPU suite compiles one
# block of each kind and no whole model, unless FUSED_RESNET_BENCH_COMPILE_ALL=1.
CPU_COMPILE_BLOCKS = ("basic-l2.0-ds", "bottleneck-l2.0-ds")


def skip_reason(variant: Variant, device_type: str, case: str) -> str | None:
    """Why ``variant`` is not run for ``case`` (a block shape name or a model name) here, or None."""
    if variant.compile_mode and device_type == "cpu" and case not in CPU_COMPILE_BLOCKS and not _env_flag(
            "FUSED_RESNET_BENCH_COMPILE_ALL", False):
        return (f"torch.compile on the CPU takes 10-40 s per case: only {', '.join(CPU_COMPILE_BLOCKS)} are "
                f"compiled here; FUSED_RESNET_BENCH_COMPILE_ALL=1 compiles every case")
    return None


def build_block(shape: BlockShape, fused: bool) -> nn.Module:
    torch.manual_seed(0)
    cls = models.BasicBlock if shape.kind == "basic" else models.Bottleneck
    expansion = cls.expansion
    downsample = None
    if shape.downsample:
        downsample = nn.Sequential(models.conv1x1(shape.inplanes, shape.planes * expansion, shape.stride),
                                   nn.BatchNorm2d(shape.planes * expansion))
    block = cls(shape.inplanes, shape.planes, shape.stride, downsample)
    _randomise_bn(block)
    return fuse(block) if fused else block


def build_model(name: str, fused: bool) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(models, name)(fused=False)
    _randomise_bn(model)
    return fuse(model) if fused else model


def _randomise_bn(module: nn.Module) -> None:
    """Non-trivial BN parameters and running statistics, so that eval is not an identity BN."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)


@dataclass
class Prepared:
    """A ready-to-time closure: ``fn()`` runs one step on ``images`` images; ``saved_fn`` runs
    the forward whose saved activations are measured (train mode only)."""

    fn: Callable[[], object]
    images: int
    saved_fn: Callable[[], object] | None = None
    # Tensors that exist whatever runs (weights, inputs): not counted as saved activations.
    exclude: list[torch.Tensor] = field(default_factory=list)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _place(module: nn.Module, variant: Variant, device: torch.device) -> nn.Module:
    module = module.to(device)
    if variant.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def _backend_ctx(variant: Variant):
    return use_backend(variant.backend) if variant.backend else contextlib.nullcontext()


def _set_mode(module: nn.Module, variant: Variant, mode: str) -> None:
    """Training or eval; a fused module in eval is served as users are told to: prepared once."""
    module.train(mode == "train")
    if mode == "eval" and variant.fused:
        with _backend_ctx(variant):
            prepare_for_inference(module)


def _compiled(module: nn.Module, variant: Variant):
    if variant.compile_mode is None:
        return module
    return torch.compile(module, mode=None if variant.compile_mode == "default" else variant.compile_mode)


def prepare_block(shape: BlockShape, variant: Variant, mode: str, sizes: Sizes, device: torch.device) -> Prepared:
    block = _place(build_block(shape, variant.fused), variant, device)
    _set_mode(block, variant, mode)
    run = _compiled(block, variant)
    size = sizes.block_size(shape)
    g = torch.Generator().manual_seed(2)
    # Between blocks of a network under autocast the activations are already in the autocast dtype.
    x = torch.randn(sizes.batch, shape.inplanes, size, size, generator=g).to(device, sizes.dtype)
    if variant.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = _autocast(device, sizes.dtype)
    if mode == "eval":
        def forward():
            with torch.no_grad(), ctx, _backend_ctx(variant):
                return run(x)
        return Prepared(forward, sizes.batch)
    x.requires_grad_(True)
    params = [p for p in block.parameters() if p.requires_grad]
    with torch.no_grad(), ctx, _backend_ctx(variant):
        probe = block(x)  # the output's shape and dtype, which the incoming gradient must have
    grad = torch.randn(probe.shape, generator=g).to(device, probe.dtype)
    del probe

    def step():
        with ctx, _backend_ctx(variant):
            out = run(x)
        return torch.autograd.grad(out, [x, *params], grad)

    def forward():
        with ctx, _backend_ctx(variant):
            return run(x)

    return Prepared(step, sizes.batch, forward, [x, *block.parameters(), *block.buffers()])


def prepare_model(name: str, variant: Variant, mode: str, sizes: Sizes, device: torch.device) -> Prepared:
    model = _place(build_model(name, variant.fused), variant, device)
    _set_mode(model, variant, mode)
    run = _compiled(model, variant)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(sizes.batch, 3, sizes.image, sizes.image, generator=g).to(device)
    if variant.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (sizes.batch,), generator=g).to(device)
    ctx = _autocast(device, sizes.dtype)
    if mode == "eval":
        def forward():
            with torch.inference_mode(), ctx, _backend_ctx(variant):
                return run(x)
        return Prepared(forward, sizes.batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def step():
        with ctx, _backend_ctx(variant):
            loss = F.cross_entropy(run(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def forward():
        with ctx, _backend_ctx(variant):
            return F.cross_entropy(run(x), y)

    return Prepared(step, sizes.batch, forward, [x, *model.parameters(), *model.buffers()])


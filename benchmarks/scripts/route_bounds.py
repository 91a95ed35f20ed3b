"""The prepared serving routes' bounds on this CPU: eager vs fused + ``prepare_for_inference`` under the
AVX2 bounds (``FUSED_RESNET_ONEDNN_MIN_MACS`` = 8 M, what every CPU took before the bounds depended on
the ISA) vs under this CPU's default bounds (``_onednn.route_bounds()``) vs autotuned, the four
interleaved round by round in one process; batch 1, fp32, speed relative to eager (median of rounds).
Models: torchvision / timm names, and ``cifar:resnet20`` (``small_resnet`` with 3 blocks a stage, 32 px).

    python benchmarks/scripts/route_bounds.py --threads 2 --image 224 [--channels-last] --models tv:resnet50 ...
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
from fuse_models_eval import build, timings_ms

import fused_resnet
from fused_resnet.backends.native._onednn import route_bounds
from fused_resnet.small_resnet import small_resnet

_AVX2_MIN_MACS = str(1 << 23)


def _model(spec: str) -> tuple[torch.nn.Module, int | None]:
    """(model, its own image size or None)."""
    if spec == "cifar:resnet20":
        return small_resnet(fused=False, blocks=(3, 3, 3)), 32
    return build(spec), None


def _prepared(eager: torch.nn.Module, min_macs: str | None, autotune: bool = False) -> torch.nn.Module:
    saved = os.environ.pop("FUSED_RESNET_ONEDNN_MIN_MACS", None)
    try:
        if min_macs is not None:
            os.environ["FUSED_RESNET_ONEDNN_MIN_MACS"] = min_macs  # read at preparation
        return fused_resnet.prepare_for_inference(fused_resnet.fuse(copy.deepcopy(eager)), autotune=autotune)
    finally:
        os.environ.pop("FUSED_RESNET_ONEDNN_MIN_MACS", None)
        if saved is not None:
            os.environ["FUSED_RESNET_ONEDNN_MIN_MACS"] = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cifar:resnet20", "tv:resnet50", "tv:mobilenet_v2"])
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {args.threads}, {'channels_last' if args.channels_last else 'NCHW'}, batch 1, fp32; "
          f"this CPU's bounds: {route_bounds()}")
    print("| model | px | eager ms | AVX2 bounds | this CPU's bounds | autotuned |")
    print("|---|---|---|---|---|---|")
    for spec in args.models:
        torch.manual_seed(0)
        eager, size = _model(spec)
        eager = eager.eval().to(memory_format=fmt)
        models = [eager, _prepared(eager, _AVX2_MIN_MACS), _prepared(eager, None), _prepared(eager, None, True)]
        size = size or args.image
        x = torch.randn(1, 3, size, size).to(memory_format=fmt)
        (eager_ms, _), *others = timings_ms(models, x, args.rounds)
        speeds = " | ".join(f"{eager_ms / ms:.2f}x" for ms, _ in others)
        print(f"| {spec} | {size} | {eager_ms:.2f} | {speeds} |", flush=True)


if __name__ == "__main__":
    main()

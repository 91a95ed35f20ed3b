"""CPU training step of real torchvision / timm models: eager vs ``fuse``, ms per step (forward,
backward, SGD step) and the bytes autograd saves for backward (parameters and the input left out),
side by side in one process. Random init, fp32, batch statistics; the fused model is a deep copy of
the eager one, fused in place, and both take the same steps on the same batches.

    python benchmarks/scripts/fuse_models_train.py [--models tv:resnet50 timm:resnet18 ...]
        [--batch 4] [--image 112] [--rounds 5] [--channels-last]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

import fused_resnet
from fused_resnet.benchmark.timing import saved_activation_bytes

from fuse_models_eval import MODELS, build


def step_fn(model: torch.nn.Module, x: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()
    return step


def timings_ms(steps, rounds: int) -> list[tuple[float, float]]:
    """(median, min) ms per step of each, the steps interleaved round by round (a load spike of a
    shared machine hits all alike)."""
    times = [[] for _ in steps]
    for step in steps:
        for _ in range(2):
            step()
    for _ in range(rounds):
        for step, acc in zip(steps, times):
            start = time.perf_counter()
            step()
            acc.append(time.perf_counter() - start)
    return [(sorted(t)[rounds // 2] * 1e3, min(t) * 1e3) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image", type=int, default=112)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f"torch {torch.__version__}, fused_resnet {fused_resnet.__version__}, backends {fused_resnet.backends()}, "
          f"{platform.processor() or platform.machine()}, threads {torch.get_num_threads()}, fp32, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, batch {args.batch}, 3x{args.image}x{args.image}")
    print("| model | BN fused | eager step ms (median / min) | fused step ms (median / min) "
          "| speedup (median / min) | eager saved MiB | fused saved MiB | fused / eager saved |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.models:
        torch.manual_seed(0)
        eager = build(spec).train().to(memory_format=fmt)
        fused = fused_resnet.fuse(copy.deepcopy(eager))
        report = fused_resnet.fusion_report(fused)
        share = f"{sum(v.startswith('fused') for v in report.values())}/{len(report)}"
        x = torch.randn(args.batch, 3, args.image, args.image).to(memory_format=fmt)
        saved = [saved_activation_bytes(lambda m=m: m(x), list(m.parameters()) + [x]) for m in (eager, fused)]
        (med_e, min_e), (med_f, min_f) = timings_ms([step_fn(eager, x), step_fn(fused, x)], args.rounds)
        mib = [f"{b / 2**20:.1f}" if b is not None else "n/a" for b in saved]
        ratio = f"{saved[1] / saved[0]:.2f}" if None not in saved else "n/a"
        print(f"| {spec} | {share} | {med_e:.1f} / {min_e:.1f} | {med_f:.1f} / {min_f:.1f} "
              f"| {med_e / med_f:.2f}x / {min_e / min_f:.2f}x | {mib[0]} | {mib[1]} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()

"""CPU eval of real torchvision / timm models: eager vs ``fuse`` (unprepared) vs ``fuse`` +
``prepare_for_inference`` (and with ``autotune=True``), median and min ms per batch, the four
interleaved round by round in one process, with the share of BatchNorms fused. Random init; all hold the same weights (the fused ones
are deep copies, fused in place).

    python benchmarks/scripts/fuse_models_eval.py [--models tv:resnet50 timm:resnet18 ...]
        [--batches 1 8] [--image 64] [--rounds 15] [--channels-last] [--prepared-only] [--threads 2]

``--prepared-only``: eager against fused + prepared alone (the serving ratio), more rounds in the same time
(the autotuned model is not even built). ``--threads``: ``torch.set_num_threads`` (default: torch's).
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

import fused_resnet

MODELS = ["tv:resnet50", "tv:resnext50_32x4d", "tv:mobilenet_v2", "tv:regnet_y_400mf",
          "timm:resnet18", "timm:resnet50", "timm:resnet50d", "timm:seresnet50", "timm:resnet26t",
          "timm:regnetx_002"]


def build(spec: str) -> torch.nn.Module:
    lib, name = spec.split(":")
    if lib == "tv":
        import torchvision

        return getattr(torchvision.models, name)()
    import timm

    return timm.create_model(name, pretrained=False)


def timings_ms(models, x, rounds: int) -> list[tuple[float, float]]:
    """(median, min) ms per call of each model, the calls interleaved round by round so that a load
    spike of a shared machine hits both alike (the min is the figure least affected by such load)."""
    times = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            for _ in range(3):  # warm-up: oneDNN primitives, allocator
                model(x)
        for _ in range(rounds):
            for model, acc in zip(models, times):
                start = time.perf_counter()
                model(x)
                acc.append(time.perf_counter() - start)
    return [(sorted(t)[rounds // 2] * 1e3, min(t) * 1e3) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--prepared-only", action="store_true", help="time only eager and fused + prepared")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f"torch {torch.__version__}, fused_resnet {fused_resnet.__version__}, backends {fused_resnet.backends()}, "
          f"{platform.processor() or platform.machine()}, threads {torch.get_num_threads()}, fp32, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, 3x{args.image}x{args.image}")
    print("| model | BN fused | batch | eager ms (median / min) | fused ms, unprepared (median / min) "
          "| fused+prepared ms (median / min) | prepared speedup (median / min) | unprepared speedup (median / min) "
          "| autotuned ms (median / min) | autotuned speedup (median / min) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.models:
        torch.manual_seed(0)
        eager = build(spec).eval().to(memory_format=fmt)
        unprepared = fused_resnet.fuse(copy.deepcopy(eager))
        report = fused_resnet.fusion_report(unprepared)
        share = f"{sum(v.startswith('fused') for v in report.values())}/{len(report)}"
        prepared = fused_resnet.prepare_for_inference(fused_resnet.fuse(copy.deepcopy(eager)))
        tuned = None if args.prepared_only else fused_resnet.prepare_for_inference(
            fused_resnet.fuse(copy.deepcopy(eager)), autotune=True)
        for batch in args.batches:
            x = torch.randn(batch, 3, args.image, args.image).to(memory_format=fmt)
            with torch.inference_mode():
                diff = max((m(x) - eager(x)).abs().max().item() for m in (prepared, tuned) if m is not None)
            if args.prepared_only:
                (med_e, min_e), (med_f, min_f) = timings_ms([eager, prepared], x, args.rounds)
                (med_u, min_u), (med_t, min_t) = (float("nan"),) * 2, (float("nan"),) * 2
            else:
                (med_e, min_e), (med_u, min_u), (med_f, min_f), (med_t, min_t) = timings_ms(
                    [eager, unprepared, prepared, tuned], x, args.rounds)
            print(f"| {spec} | {share} | {batch} | {med_e:.2f} / {min_e:.2f} | {med_u:.2f} / {min_u:.2f} "
                  f"| {med_f:.2f} / {min_f:.2f} | {med_e / med_f:.2f}x / {min_e / min_f:.2f}x "
                  f"| {med_e / med_u:.2f}x / {min_e / min_u:.2f}x | {med_t:.2f} / {min_t:.2f} "
                  f"| {med_e / med_t:.2f}x / {min_e / min_t:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()

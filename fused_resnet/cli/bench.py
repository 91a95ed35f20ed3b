"""``python -m fused_resnet bench``: a quick side-by-side run of a whole ResNet on this device.

Every variant (eager NCHW, eager channels_last, ``torch.compile``, fused with each available
backend) runs the same training step (forward, cross-entropy, backward, SGD) and the same
inference on the same inputs; the median of several synchronised rounds is reported as images/s
with the speedups against eager and compile, peak CUDA memory and the activations saved for
backward. Writes ``bench.json`` (pytest-benchmark's format, so ``benchmarks/report.py`` reads it),
``ratios.md`` and ``speedup.png``. The full suite with every block shape is ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from .._torchrun import resolve_device
from ..benchmark import timing
from ..benchmark.cases import MODELS, MODES, Sizes, default_sizes, prepare_model, variants
from ..benchmark.machine import machine_info
from ..benchmark.report import ratio_table, write_report
from . import positive_int

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="resnet18", choices=MODELS, help="(default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=None, help="images per step (default: 256 CUDA, 4 CPU)")
    parser.add_argument("--image-size", type=positive_int, default=None, help="(default: 224 CUDA, 56 CPU)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="autocast dtype; fp32 = no autocast (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both",
                        help="train step, eval forward, or both (default: %(default)s)")
    parser.add_argument("--variants", default=None, metavar="A,B",
                        help="only these variants (names as in the table, e.g. eager,fused_reference)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="include torch.compile (default: on CUDA; off on CPU, where it compiles for minutes)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="timed rounds (default: 20 CUDA, 5 CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default: %(default)s)")
    parser.add_argument("--out", default="fused_resnet_bench", metavar="DIR",
                        help="folder for bench.json, ratios.md and speedup.png (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def select_variants(args: argparse.Namespace, device_type: str) -> list:
    """The variants to run: all available, less compile on CPU unless asked, filtered by --variants."""
    chosen = variants(device_type)
    use_compile = args.compile if args.compile is not None else device_type == "cuda"
    if not use_compile:
        chosen = [v for v in chosen if v.compile_mode is None]
    if args.variants:
        wanted = [w.strip() for w in args.variants.split(",") if w.strip()]
        known = {v.name for v in variants(device_type)}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise ValueError(f"unknown variant(s) {', '.join(unknown)}; available here: {', '.join(sorted(known))}")
        chosen = [v for v in variants(device_type) if v.name in wanted]
    return chosen


def run(args: argparse.Namespace) -> int:
    try:
        device = resolve_device(args.device)
        base = default_sizes(device.type)
        sizes = Sizes(args.batch or base.batch, args.image_size or base.image,
                      DTYPES[args.dtype] if args.dtype else base.dtype)
        chosen = select_variants(args, device.type)
    except (ValueError, RuntimeError) as exc:
        print(f"fused_resnet bench: {exc}", file=sys.stderr)
        return 2
    modes = MODES if args.mode == "both" else (args.mode,)
    rounds = args.rounds or (20 if device.type == "cuda" else 5)
    warmup = 3 if device.type == "cuda" else 1
    print(f"bench {args.model}: batch {sizes.batch}, {sizes.image}x{sizes.image}, {str(sizes.dtype)[6:]}, "
          f"{device}, variants {', '.join(v.name for v in chosen)}")
    bar = _bar(len(chosen) * len(modes) * (rounds + warmup), args.progress)
    results = []
    for mode in modes:
        for variant in chosen:
            bar.set_description(f"{mode} {variant.name}")
            torch._dynamo.reset()
            prepared = prepare_model(args.model, variant, mode, sizes, device)
            for _ in range(warmup):
                prepared.fn()
                bar.update(1)
            median, samples = timing.median_seconds(prepared.fn, rounds=rounds, warmup=0, on_round=lambda: bar.update(1))
            extra = {"kind": "model", "case": args.model, "mode": mode, "variant": variant.name,
                     "batch": sizes.batch, "dtype": str(sizes.dtype)[6:], "input_size": sizes.image,
                     "images_per_s": sizes.batch / median,
                     "peak_memory_bytes": timing.peak_memory_bytes(prepared.fn, device)}
            if prepared.saved_fn is not None:
                extra["saved_activation_bytes"] = timing.saved_activation_bytes(prepared.saved_fn, prepared.exclude)
            results.append({"name": f"{args.model}-{mode}-{variant.name}", "group": f"model {args.model} {mode}",
                            "extra_info": extra, "stats": _stats(samples)})
            del prepared
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()
    data = {"machine_info": machine_info(device, sizes), "benchmarks": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(data, indent=1))
    print(_variant_table(results))
    print()
    print(ratio_table(data))
    _, png = write_report(out / "bench.json", out)  # results exist: the chart is drawn
    print(f"wrote {out / 'bench.json'}, {out / 'ratios.md'} and {png}")
    return 0


def _stats(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "mean": statistics.fmean(samples), "rounds": len(samples), "data": samples}


def _variant_table(results: list[dict]) -> str:
    lines = [f"{'mode':<6} {'variant':<22} {'median ms':>10} {'images/s':>10} {'peak MiB':>9} {'saved MiB':>9}"]
    for r in results:
        e = r["extra_info"]
        peak, saved = e.get("peak_memory_bytes"), e.get("saved_activation_bytes")
        lines.append(f"{e['mode']:<6} {e['variant']:<22} {1e3 * r['stats']['median']:>10.2f} "
                     f"{e['images_per_s']:>10,.0f} {_mib(peak):>9} {_mib(saved):>9}")
    return "\n".join(lines)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="round", dynamic_ncols=True)

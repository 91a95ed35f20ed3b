"""CPU serving, side by side in one process: eager, fused, and both under ``torch.compile`` with and
without inductor's freezing (which turns parameters into constants, so the BN fold and oneDNN's weight
reorder happen once), and fused after ``fused_resnet.prepare_for_inference`` (BN folded and weights
reordered once, eagerly). Prints median ms per batch.

    python benchmarks/scripts/cpu_serving_compile.py [--model resnet18] [--batch 4] [--image 56]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch._inductor.config as inductor_config

import fused_resnet
from fused_resnet import models


def median_ms(fn, x, rounds: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return sorted(times)[rounds // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image", type=int, default=56)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    cl = torch.channels_last
    eager = getattr(models, args.model)(fused=False).eval().to(memory_format=cl)
    fused = fused_resnet.fuse(getattr(models, args.model)(fused=False)).eval().to(memory_format=cl)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(args.batch, 3, args.image, args.image).to(memory_format=cl)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.model}, batch {args.batch}, "
          f"{args.image}x{args.image}, fp32, channels_last")
    rows = {"eager": median_ms(eager, x, args.rounds), "fused": median_ms(fused, x, args.rounds)}
    prepared = fused_resnet.prepare_for_inference(copy.deepcopy(fused))
    rows["fused, prepare_for_inference"] = median_ms(prepared, x, args.rounds)
    for freezing in (False, True):
        inductor_config.freezing = freezing
        torch._dynamo.reset()
        suffix = "freezing" if freezing else "no freezing"
        rows[f"compile(eager), {suffix}"] = median_ms(torch.compile(eager), x, args.rounds)
        rows[f"compile(fused), {suffix}"] = median_ms(torch.compile(fused), x, args.rounds)
    for name, ms in rows.items():
        print(f"  {name:<28} {ms:8.2f} ms   {rows['eager'] / ms:5.2f}x eager")


if __name__ == "__main__":
    main()

"""Half-precision training gradients, fused against eager, both against an fp64 model.

One training step (cross-entropy, backward) of the lifecycle tests' ``tiny_net(8)`` (stem, two
BasicBlocks, a Bottleneck; batch 4 of 10 px, channels_last) from a common random state: for each
seed, the worst parameter's relative gradient error of the fused model over eager's own in the same
precision. Under autocast (fp32 parameters, the usual mixed precision) and with the model cast to
the half type. The measurement behind README's "Low-precision gradients" (docs/design.md).

    PYTHONPATH=. python benchmarks/scripts/half_grad_error.py [--seeds 6]
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys

import torch
import torch.nn.functional as F

import fused_resnet
from fused_resnet._tolerances import relative_error

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
from _lifecycle import tiny_net  # noqa: E402


def worst_ratio(seed: int, dtype: torch.dtype, backend: str, cast_model: bool) -> tuple[float, str]:
    """(fused error / eager error, parameter name) for the worst parameter of one step."""
    torch.manual_seed(seed)
    base = tiny_net(8).to(memory_format=torch.channels_last)
    gold, plain, fused = copy.deepcopy(base).double(), copy.deepcopy(base), fused_resnet.fuse(copy.deepcopy(base))
    if cast_model:
        plain, fused = plain.to(dtype), fused.to(dtype)
    x = torch.randn(4, 3, 10, 10).to(memory_format=torch.channels_last)
    target = torch.randint(0, 5, (4,))

    def grads(model, inputs, autocast):
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = model(inputs)
        F.cross_entropy(out.double(), target).backward()
        return {name: p.grad.double() for name, p in model.named_parameters()}

    with fused_resnet.use_backend(backend):
        oracle = grads(gold, x.double(), False)
        inputs = x.to(dtype) if cast_model else x
        eager, ours = grads(plain, inputs, not cast_model), grads(fused, inputs, not cast_model)
    return max((relative_error(ours[n], oracle[n]) / relative_error(eager[n], oracle[n]), n) for n in oracle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    args = parser.parse_args()
    print(f"torch {torch.__version__}; worst parameter's gradient error, fused / eager, per seed")
    for cast_model in (False, True):
        for dtype in (torch.bfloat16, torch.float16):
            for backend in ("native", "reference"):
                ratios = [worst_ratio(seed, dtype, backend, cast_model) for seed in range(args.seeds)]
                worst = max(ratios)
                mode = f"{str(dtype)[6:]} model" if cast_model else f"{str(dtype)[6:]} autocast"
                print(f"  {mode:17s} {backend:9s} max {worst[0]:5.1f}x ({worst[1]})  per seed: "
                      + " ".join(f"{r:.1f}" for r, _ in ratios))


if __name__ == "__main__":
    main()

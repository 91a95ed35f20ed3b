"""Where a fused training step loses to eager on the CPU, per part: one torchvision BasicBlock of
ResNet-18 at the suite's CPU sizes (batch 4, 56 px input: layer1 64 ch at 14x14 ... layer4 512 ch
at 2x2), forward + backward, fused (native) and eager, NCHW, one thread.

Each block is profiled (``torch.profiler``) and its time split into: the convolutions forward
(``mkldnn_convolution``), the convolutions backward (``convolution_backward``), the other kernels
(ours: statistics, prologue recompute, BN apply/backward; eager's: ``native_batch_norm`` and its
backward, ReLU), and the rest of the wall time, which is the host: Python, dispatch, autograd.
The wall times are measured apart, without the profiler, best of rounds, interleaved.

    python benchmarks/scripts/train_parts.py [--rounds 7] [--calls 20] [--models]

``--models``: whole ResNet-18/50 training steps instead (all threads), fused and eager interleaved.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torch.profiler import profile

import fused_resnet
from fused_resnet.resnet_arch import BasicBlock

from host_cost import best_us  # this folder: run as `python benchmarks/scripts/train_parts.py`

# (name, channels, spatial size) of a ResNet-18 stage's identity block at the suite's CPU input (56 px).
STAGES = [("layer1", 64, 14), ("layer2", 128, 7), ("layer3", 256, 4), ("layer4", 512, 2)]
CONV_FWD, CONV_BWD = "aten::mkldnn_convolution", "aten::convolution_backward"


def _step(block, x):
    def run():
        block(x).sum().backward()
    return run


def _kernel_parts(fn, calls: int) -> dict:
    """Self time per call (us) of the conv forward, conv backward and the other kernels (ATen ops
    and ours that do work), from the profiler."""
    with profile() as prof:
        for _ in range(calls):
            fn()
    parts = {"conv fwd": 0.0, "conv bwd": 0.0, "other kernels": 0.0}
    for e in prof.key_averages():
        if e.key == CONV_FWD:
            parts["conv fwd"] += e.self_cpu_time_total
        elif e.key == CONV_BWD:
            parts["conv bwd"] += e.self_cpu_time_total
        elif e.key.startswith(("aten::", "fused_resnet::")) and e.key not in ("aten::empty", "aten::empty_like",
                                                                             "aten::empty_strided"):
            parts["other kernels"] += e.self_cpu_time_total
    return {k: v / calls for k, v in parts.items()}


def model_steps(rounds: int, calls: int) -> None:
    """Whole ResNet-18 and ResNet-50 training steps (forward, cross-entropy, backward, SGD) at the
    suite's CPU sizes, fused and eager, interleaved, best round: the suite's train rows, in one run."""
    from fused_resnet import models

    x, y = torch.randn(4, 3, 56, 56), torch.randint(0, 1000, (4,))
    for name in ("resnet18", "resnet50"):
        torch.manual_seed(0)
        eager = getattr(models, name)(fused=False).train()
        fused = fused_resnet.fuse(copy.deepcopy(eager))
        fns = {}
        for variant, model in (("fused", fused), ("eager", eager)):
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            fns[variant] = step
        wall = best_us(fns, rounds, calls)
        print(f"  {name} training step: fused {wall['fused'] / 1e3:.1f} ms, eager {wall['eager'] / 1e3:.1f} ms, "
              f"fused speed {wall['eager'] / wall['fused']:.2f}x eager's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--models", action="store_true", help="whole ResNet-18/50 training steps instead")
    args = parser.parse_args()
    if args.models:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, NCHW, batch 4, 56 px")
        model_steps(args.rounds, max(args.calls // 10, 2))
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread, NCHW, batch 4; per block forward+backward, us per call")
    print(f"  {'block':<16} {'variant':<6} {'wall':>8} {'conv fwd':>9} {'conv bwd':>9} {'other':>8} {'host':>8}")
    for name, c, size in STAGES:
        eager = BasicBlock(c, c).train()
        fused = fused_resnet.fuse(nn.Sequential(copy.deepcopy(eager)))
        x = torch.randn(4, c, size, size, requires_grad=True)
        fns = {"fused": _step(fused, x), "eager": _step(eager, x)}
        wall = best_us(fns, args.rounds, args.calls)
        for variant, fn in fns.items():
            parts = _kernel_parts(fn, args.calls)
            host = wall[variant] - sum(parts.values())
            print(f"  {name + f' {c}x{size}x{size}':<16} {variant:<6} {wall[variant]:8.0f} {parts['conv fwd']:9.0f} "
                  f"{parts['conv bwd']:9.0f} {parts['other kernels']:8.0f} {host:8.0f}")
        print(f"  {'':<16} {'ratio':<6} {wall['fused'] / wall['eager']:8.2f}x")


if __name__ == "__main__":
    main()

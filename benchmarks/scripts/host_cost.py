"""Host cost of the fused ops against the eager ops they replace, side by side in one process.

Tiny tensors on one CPU thread, so that kernel time is nearly nil and what is measured is the cost
of getting there (Python, dispatcher, autograd): the cost a GPU run pays on the host for every op.
Each row times the fused call and the eager sequence interleaved, round after round, and reports
the best round of each (the least disturbed by other load) and their ratio; then whole small models
(CIFAR ResNet-20: eval at batch 1, a training step at batch 32; the default model of ``python -m
fused_resnet train``: a step at its batch of 64 16-px images) the same way; last, the parts of
``conv_bn_relu`` (the forward alone, and ATen's conv forward and backward, which both sides pay).

    python benchmarks/scripts/host_cost.py [--rounds 7] [--calls 300] [--clock wall|cpu]

``--clock cpu`` times this thread's CPU time (``time.thread_time``) instead of the wall clock: on a
machine shared with other load, the time the thread waits for a core then does not count (torch runs
on this one thread here, so nothing of the work is left out).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from fused_resnet import ops
from fused_resnet.small_resnet import small_resnet


CLOCK = time.perf_counter


def best_us(fns: dict, rounds: int, calls: int) -> dict:
    """Best per-call microseconds of each function (by ``CLOCK``), the functions interleaved round by round."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        for _ in range(max(calls // 10, 3)):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = CLOCK()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (CLOCK() - start) / calls * 1e6)
    return best


def op_cases():
    """(name, fused fn, eager fn) for each fused op, on one 8-channel 8x8 activation."""
    c = 8
    x = torch.randn(2, c, 8, 8, requires_grad=True)
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
    bn, bn_r = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
    residual = torch.randn(2, c, 8, 8, requires_grad=True)
    bias = torch.randn(c)

    def fused_conv_bn_relu():
        out = ops.conv_bn_relu(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                               bn.num_batches_tracked, padding=1)
        out.sum().backward()

    def eager_conv_bn_relu():
        torch.relu(bn(conv(x))).sum().backward()

    def fused_conv_bias_act():
        with torch.no_grad():
            ops.conv_bias_act(x, conv.weight, bias, padding=1)

    def eager_conv_bias_act():
        with torch.no_grad():
            torch.relu(F.conv2d(x, conv.weight, bias, padding=1))

    scale, shift = torch.rand(c, requires_grad=True), torch.randn(c, requires_grad=True)
    deferred = ops.DeferredBN(x, scale, shift)

    def fused_bn_add_relu():
        ops.bn_add_relu(deferred, residual).sum().backward()

    def eager_bn_add_relu():
        torch.relu(bn_r(x) + residual).sum().backward()

    return [
        ("conv_bn_relu forward+backward", fused_conv_bn_relu, eager_conv_bn_relu),
        ("conv_bias_act under no_grad", fused_conv_bias_act, eager_conv_bias_act),
        ("bn_add_relu forward+backward", fused_bn_add_relu, eager_bn_add_relu),
    ]


def part_cases():
    """Named fns: ``conv_bn_relu`` taken apart. The forward alone (graph built, no
    backward), and ATen's convolution forward and backward on the same shapes, which both sides pay
    (the rest of each side is its host cost and its non-conv kernels)."""
    c = 8
    x = torch.randn(2, c, 8, 8, requires_grad=True)
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(c)
    xd, wd = x.detach(), conv.weight.detach()
    g = torch.randn(2, c, 8, 8)

    def fused_forward():
        ops.conv_bn_relu(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                         padding=1)

    def eager_forward():
        torch.relu(bn(conv(x)))

    def conv_forward():
        F.conv2d(xd, wd, None, 1, 1)

    def conv_backward():
        torch.ops.aten.convolution_backward(g, xd, wd, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                            [True, True, False])

    return {"fused forward only": fused_forward, "eager forward only": eager_forward,
            "ATen conv2d forward": conv_forward, "ATen convolution_backward": conv_backward}


def model_cases():
    """(name, fused fn, eager fn) for a CIFAR ResNet-20 (3 BasicBlocks a stage, widths 16-32-64)."""
    torch.manual_seed(0)
    cl = torch.channels_last
    eager = small_resnet(fused=False, blocks=(3, 3, 3)).to(memory_format=cl)
    fused = fused_resnet.fuse(copy.deepcopy(eager))
    eager_eval, fused_eval = copy.deepcopy(eager).eval(), fused_resnet.prepare_for_inference(copy.deepcopy(fused))
    x1 = torch.randn(1, 3, 32, 32).to(memory_format=cl)
    x32, y32 = torch.randn(32, 3, 32, 32).to(memory_format=cl), torch.randint(0, 10, (32,))
    # `python -m fused_resnet train`'s default: small_resnet(), batch 64 of 16 px digits, NCHW.
    small_eager = small_resnet(fused=False)
    small_fused = fused_resnet.fuse(copy.deepcopy(small_eager))
    x64, y64 = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))

    def serve(model):
        def run():
            with torch.inference_mode():
                model(x1)
        return run

    def train(model, x, y):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def run():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return run

    return [
        ("ResNet-20 eval, batch 1 (prepared)", serve(fused_eval), serve(eager_eval)),
        ("ResNet-20 training step, batch 32", train(fused, x32, y32), train(eager, x32, y32)),
        ("train's model, training step, batch 64", train(small_fused, x64, y64), train(small_eager, x64, y64)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, backend {fused_resnet.get_backend()} "
          f"(runs on: {', '.join(fused_resnet.backends('cpu'))}); best of {args.rounds} rounds, {args.clock} clock")
    print(f"  {'case':<38} {'fused':>10} {'eager':>10} {'fused/eager':>12}")
    for cases, calls in ((op_cases(), args.calls), (model_cases(), max(args.calls // 30, 3))):
        for name, fused_fn, eager_fn in cases:
            t = best_us({"fused": fused_fn, "eager": eager_fn}, args.rounds, calls)
            unit, div = ("us", 1.0) if t["eager"] < 1e4 else ("ms", 1e3)
            print(f"  {name:<38} {t['fused'] / div:8.1f}{unit} {t['eager'] / div:8.1f}{unit} "
                  f"{t['fused'] / t['eager']:11.2f}x")
    print("  conv_bn_relu's parts (forward+backward above, less the forward: the backward):")
    for name, us in best_us(part_cases(), args.rounds, args.calls).items():
        print(f"    {name:<36} {us:8.1f}us")


if __name__ == "__main__":
    main()

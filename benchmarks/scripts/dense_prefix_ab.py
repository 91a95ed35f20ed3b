"""A/B on the CPU, 1 thread: conv_stats + conv_stats_backward (1x1, BN+ReLU prologue) on a channel
prefix of a dense NCHW buffer (a DenseNet layer's input), read in place vs through a dense copy in
forward and in backward (what the native op did before it took the batch stride), interleaved.

    PYTHONPATH=$PWD python benchmarks/scripts/dense_prefix_ab.py
"""

import statistics
import time

import torch

import fused_resnet  # noqa: F401  (registers torch.ops.fused_resnet)

ops = torch.ops.fused_resnet
CONV = ([1, 1], [0, 0], [1, 1], 1)  # stride, padding, dilation, groups


def case(n: int, buffer_channels: int, c: int, hw: int, cout: int = 128, rounds: int = 30) -> None:
    x = torch.randn(n, buffer_channels, hw, hw)[:, :c]
    w = torch.randn(cout, c, 1, 1) / c ** 0.5
    scale, shift = torch.rand(c) + 0.5, torch.randn(c)
    y, mean, var = ops.conv_stats(x, scale, shift, True, w, *CONV)
    gy, gm, gv = torch.randn_like(y), torch.randn_like(mean), torch.randn_like(var)

    def run(prep) -> float:
        start = time.perf_counter()
        ops.conv_stats(prep(x), scale, shift, True, w, *CONV)
        ops.conv_stats_backward(gy, gm, gv, prep(x), scale, shift, True, w, y, mean, *CONV, [True, True, True])
        return time.perf_counter() - start

    in_place, copied = [], []
    for _ in range(rounds):
        in_place.append(run(lambda t: t))
        copied.append(run(lambda t: t.contiguous()))
    print(f"N={n} buffer C={buffer_channels} prefix C={c} {hw}x{hw}: in place "
          f"{statistics.median(in_place) * 1e3:.2f} ms, dense copy {statistics.median(copied) * 1e3:.2f} ms "
          f"(medians of {rounds}, interleaved)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for shape in [(8, 256, 224, 16), (8, 512, 480, 8), (8, 1024, 992, 4)]:  # DenseNet-121 at 64x64, batch 8
        case(*shape)

"""A CIFAR ResNet-20 written the simple way (blocks with their adds in their own forward, issue #13):
eager vs fused (+ prepared in eval) on the CPU, min over interleaved rounds; beside it the same network
built from torchvision-structured blocks (``small_resnet``, fused as whole ``FusedBasicBlock``s), prepared.

    PYTHONPATH=$PWD python benchmarks/scripts/user_forward.py [--threads 1] [--rounds 15]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from fused_resnet.small_resnet import small_resnet


class Block(nn.Module):
    """torchvision's BasicBlock written out under its own names: ``relu(bn2(conv2(...)) + shortcut)``."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        out += x if self.short is None else self.short(x)
        return F.relu(out)


class ResNet20(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(Block(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def _min_interleaved(fns: dict, rounds: int) -> dict[str, float]:
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    eager = ResNet20()
    fused = fused_resnet.fuse(copy.deepcopy(eager))
    report = fused_resnet.fusion_report(fused)
    fused_bns = sum(v.startswith("fused") for v in report.values())
    print(f"torch {torch.__version__}, threads {args.threads}: BNs fused {fused_bns}/{len(report)}, "
          f"with the add in a forward {sum('residual add' in v for v in report.values())}")
    for batch in (1, 8):
        x = torch.randn(batch, 3, 32, 32)
        eager.eval(), fused.eval()
        prepared = fused_resnet.prepare_for_inference(copy.deepcopy(fused))
        blocks = fused_resnet.prepare_for_inference(fused_resnet.fuse(small_resnet(fused=False, blocks=(3, 3, 3))))
        with torch.no_grad():
            t = _min_interleaved({"eager": lambda: eager(x), "fused": lambda: fused(x),
                                  "prepared": lambda: prepared(x), "blocks": lambda: blocks(x)}, args.rounds)
        print(f"eval batch {batch}: eager {t['eager'] * 1e3:.2f} ms, fused {t['fused'] * 1e3:.2f} ms "
              f"({t['eager'] / t['fused']:.2f}x), prepared {t['prepared'] * 1e3:.2f} ms "
              f"({t['eager'] / t['prepared']:.2f}x); torchvision-structured blocks fused, prepared "
              f"{t['blocks'] * 1e3:.2f} ms")
    x = torch.randn(32, 3, 32, 32)
    eager.train(), fused.train()
    t = _min_interleaved({"eager": lambda: eager(x).sum().backward(), "fused": lambda: fused(x).sum().backward()},
                         max(3, args.rounds // 3))
    print(f"train step batch 32: eager {t['eager'] * 1e3:.1f} ms, fused {t['fused'] * 1e3:.1f} ms "
          f"(time {t['fused'] / t['eager']:.2f}x eager's)")


if __name__ == "__main__":
    main()

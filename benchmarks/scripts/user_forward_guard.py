"""Host cost of the per-call check of a traced user forward (``FusedTracedForward.fusable``) beside a
fused torchvision-structured block's (``_fused_pairs``): timeit, min of 7 rounds of 2000 calls.

    PYTHONPATH=$PWD python benchmarks/scripts/user_forward_guard.py
"""

from __future__ import annotations

import os
import sys
import timeit

sys.path.insert(0, os.path.dirname(__file__))

import fused_resnet  # noqa: E402
from fused_resnet.small_resnet import small_resnet  # noqa: E402
from user_forward import ResNet20  # noqa: E402


def _us(fn) -> float:
    return min(timeit.repeat(fn, number=2000, repeat=7)) / 2000 * 1e6


def main() -> None:
    traced = fused_resnet.fuse(ResNet20()).eval().blocks[3]  # a block with a conv -> BN shortcut
    blocks = fused_resnet.fuse(small_resnet(fused=False)).eval()
    block = [m for m in blocks.modules() if hasattr(m, "_fused_pairs")][1]
    print(f"traced forward's check: {_us(traced.fusable):.1f} us; fused BasicBlock's check: "
          f"{_us(block._fused_pairs):.1f} us")


if __name__ == "__main__":
    main()

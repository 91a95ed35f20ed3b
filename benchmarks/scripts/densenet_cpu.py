"""DenseNet-121 training step on the CPU: eager, torchvision's ``memory_efficient=True`` and fused
(``fused_resnet.fuse``), side by side in one process, from the same weights and batch.

Reports, per variant: bytes of activations saved for backward (distinct storages; for
``memory_efficient=True`` also the inputs each checkpoint keeps alive for its recomputation, which
``saved_tensors_hooks`` do not see), and the training-step time (forward + backward, ``zero_grad``
outside), the variants interleaved round by round (best and median): the machine is shared, so only
ratios within a run mean much. Then accuracy: every variant's output, parameter gradients and running
statistics after one step in fp32 vs the unfused model in fp64, and the fused model in fp64 too.

    python benchmarks/scripts/densenet_cpu.py [--batch 8] [--size 64] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import time

import torch
import torchvision

import fused_resnet
from fused_resnet._tolerances import relative_error
from fused_resnet.benchmark.saved_memory import saved_activation_bytes_with_checkpoints
from fused_resnet.benchmark.timing import saved_activation_bytes


def saved_bytes(model, x) -> tuple[int, int]:
    """(with checkpoint inputs, saved-tensor hooks only), parameters and input left out."""
    return (saved_activation_bytes_with_checkpoints(model, x),
            saved_activation_bytes(lambda: model(x), [x, *model.parameters()]))


def step(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out


def timed(models: dict, x, rounds: int) -> dict:
    times = {k: [] for k in models}
    for m in models.values():
        step(m, x)
    for _ in range(rounds):
        for name, m in models.items():
            start = time.perf_counter()
            step(m, x)
            times[name].append(time.perf_counter() - start)
    return times


def accuracy(models32: dict, plain64, fused64, x) -> dict:
    """Worst relative error over output, every gradient and every float buffer vs ``plain64``."""
    def run(m, inp):
        m.zero_grad(set_to_none=True)
        out = m(inp)
        out.square().mean().backward()
        return out

    ref_out = run(plain64, x.double())
    ref = {"output": ref_out, **{f"grad {n}": p.grad for n, p in plain64.named_parameters()},
           **{n: b for n, b in plain64.named_buffers() if b.is_floating_point()}}
    result = {}
    for name, m in {**models32, "fused fp64": fused64}.items():
        inp = x.double() if m is fused64 else x
        out = run(m, inp)
        got = {"output": out, **{f"grad {n}": p.grad for n, p in m.named_parameters()},
               **{n: b for n, b in m.named_buffers() if b.is_floating_point()}}
        errors = {k: relative_error(got[k], v) for k, v in ref.items()}
        worst = max(errors, key=errors.get)
        result[name] = (errors["output"], max(v for k, v in errors.items() if k.startswith("grad")),
                        max(v for k, v in errors.items() if not k.startswith(("grad", "output"))), worst, errors[worst])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    eager = torchvision.models.densenet121()
    memeff = torchvision.models.densenet121(memory_efficient=True)
    memeff.load_state_dict(eager.state_dict())
    fused = fused_resnet.fuse(copy.deepcopy(eager))
    base = copy.deepcopy(eager)  # the weights and statistics every accuracy check starts from
    models = {"eager": eager, "memory_efficient=True": memeff, "fused": fused}
    for m in models.values():
        m.train()
    x = torch.randn(args.batch, 3, args.size, args.size)
    report = fused_resnet.fusion_report(fused)
    print(f"# {' '.join(['python', *os.sys.argv])}")
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    print(f"# densenet121, batch {args.batch}, {args.size}x{args.size}, fp32, training step "
          f"(forward + backward); fusion_report: {sum(v.startswith('fused') for v in report.values())}"
          f"/{len(report)} BatchNorms fused")
    print("\n| variant | saved-activation MiB | vs eager | (hooks only) | step ms best | median | vs eager (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    memory = {k: saved_bytes(m, x) for k, m in models.items()}
    times = timed(models, x, args.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in models:
        total, hooks = memory[name]
        print(f"| {name} | {total / 2**20:.1f} | {total / memory['eager'][0]:.2f}x | {hooks / 2**20:.1f} | "
              f"{min(times[name]) * 1e3:.0f} | {med[name] * 1e3:.0f} | {med[name] / med['eager']:.2f}x |")
    torch.manual_seed(0)
    small = torch.randn(2, 3, 32, 32)
    plain64 = copy.deepcopy(base).double()
    fused64 = fused_resnet.fuse(copy.deepcopy(base).double())
    memeff32 = torchvision.models.densenet121(memory_efficient=True)
    memeff32.load_state_dict(base.state_dict())
    acc = accuracy({"eager": copy.deepcopy(base), "memory_efficient=True": memeff32.train(),
                    "fused": fused_resnet.fuse(copy.deepcopy(base))}, plain64, fused64, small)
    print("\nAccuracy vs the unfused model in fp64 (batch 2, 32x32, one step; relative L2 error):\n")
    print("| variant | output | worst gradient | worst running stat | worst overall |")
    print("|---|---:|---:|---:|---|")
    for name, (out, grad, buf, worst, err) in acc.items():
        print(f"| {name} | {out:.2e} | {grad:.2e} | {buf:.2e} | {worst}: {err:.2e} |")


if __name__ == "__main__":
    main()

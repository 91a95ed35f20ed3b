"""DenseNet-121 training step on the CPU: eager, torchvision's ``memory_efficient=True`` and fused
(``fused_resnet.fuse``), side by side in one process, from the same weights and batch.

Reports, per variant: bytes of activations saved for backward (distinct storages; for
``memory_efficient=True`` also the inputs each checkpoint keeps alive for its recomputation, which
``saved_tensors_hooks`` do not see), and the training-step time (forward + backward, ``zero_grad``
outside), the variants interleaved round by round (best and median): the machine is shared, so only
ratios within a run mean much. Then accuracy: every variant's output, parameter gradients and running
statistics after one step in fp32 vs the unfused model in fp64, and the fused model in fp64 too.

    python benchmarks/scripts/densenet_cpu.py [--batch 8] [--size 64] [--rounds 7] [--threads N]
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
from fused_resnet.benchmark.saved_memory import saved_activation_bytes_with_checkpoints
from fused_resnet.benchmark.timing import saved_activation_bytes


def saved_bytes(model, x) -> tuple[int, int]:
    """(with checkpoint inputs, saved-tensor hooks only), parameters and input left out."""
    return (saved_activation_bytes_with_checkpoints(model, x),
            saved_activation_bytes(lambda: model(x), [x, *model.parameters()]))


def step(model, x) -> tuple[float, float]:
    """One training step; (forward seconds, backward seconds)."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = model(x)
    middle = time.perf_counter()
    out.square().mean().backward()
    return middle - start, time.perf_counter() - middle


def timed(models: dict, x, rounds: int) -> dict:
    """Per variant, a list of (forward, backward) seconds, the variants interleaved round by round."""
    times = {k: [] for k in models}
    for m in models.values():
        step(m, x)
    for _ in range(rounds):
        for name, m in models.items():
            times[name].append(step(m, x))
    return times


def _errors(got: dict, ref: dict) -> dict:
    """Relative L2 error of each entry; a gradient is measured relative to at least 1e-6 of the
    largest reference gradient (a gradient that is zero in exact arithmetic is rounding noise)."""
    floor = 1e-6 * max(v.norm().item() for k, v in ref.items() if k.startswith("grad"))
    return {k: (got[k] - v).double().norm().item() / max(v.double().norm().item(), floor if k.startswith("grad")
                                                           else 0.0) for k, v in ref.items()}


def accuracy(models32: dict, plain64, fused64, x) -> dict:
    """(output, worst gradient, worst running statistic, worst overall) relative errors vs ``plain64``
    after one training step on ``x`` (``_errors``)."""
    def run(m, inp):
        m.zero_grad(set_to_none=True)
        out = m(inp)
        out.square().mean().backward()
        return {"output": out, **{f"grad {n}": p.grad for n, p in m.named_parameters()},
                **{n: b for n, b in m.named_buffers() if b.is_floating_point()}}

    ref = run(plain64, x.double())
    result = {}
    for name, m in {**models32, "fused fp64": fused64}.items():
        errors = _errors(run(m, x.double() if m is fused64 else x), ref)
        worst = max(errors, key=errors.get)
        result[name] = (errors["output"], max(v for k, v in errors.items() if k.startswith("grad")),
                        max(v for k, v in errors.items() if not k.startswith(("grad", "output"))), worst, errors[worst])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
    print("\n| variant | saved-activation MiB | vs eager | (hooks only) | step ms best | median | vs eager (median) "
          "| forward ms median | backward ms median |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    memory = {k: saved_bytes(m, x) for k, m in models.items()}
    times = timed(models, x, args.rounds)
    steps = {k: [f + b for f, b in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in steps.items()}
    for name in models:
        total, hooks = memory[name]
        forward = statistics.median(f for f, _ in times[name])
        backward = statistics.median(b for _, b in times[name])
        print(f"| {name} | {total / 2**20:.1f} | {total / memory['eager'][0]:.2f}x | {hooks / 2**20:.1f} | "
              f"{min(steps[name]) * 1e3:.0f} | {med[name] * 1e3:.0f} | {med[name] / med['eager']:.2f}x | "
              f"{forward * 1e3:.0f} | {backward * 1e3:.0f} |")
    torch.manual_seed(0)
    small = torch.randn(2, 3, 64, 64)  # 2x2 maps in the last block: a BN over 2 values is ill-conditioned
    plain64 = copy.deepcopy(base).double()
    fused64 = fused_resnet.fuse(copy.deepcopy(base).double())
    memeff32 = torchvision.models.densenet121(memory_efficient=True)
    memeff32.load_state_dict(base.state_dict())
    acc = accuracy({"eager": copy.deepcopy(base), "memory_efficient=True": memeff32.train(),
                    "fused": fused_resnet.fuse(copy.deepcopy(base))}, plain64, fused64, small)
    print("\nAccuracy vs the unfused model in fp64 (the same weights; batch 2, 64x64, one training step; relative L2 "
          "error; a gradient relative to at least 1e-6 of the largest):\n")
    print("| variant | output | worst gradient | worst running stat | worst overall |")
    print("|---|---:|---:|---:|---|")
    for name, (out, grad, buf, worst, err) in acc.items():
        print(f"| {name} | {out:.2e} | {grad:.2e} | {buf:.2e} | {worst}: {err:.2e} |")


if __name__ == "__main__":
    main()

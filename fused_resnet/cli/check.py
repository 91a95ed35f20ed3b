"""``python -m fused_resnet check``: every available backend against the reference on this device.

For each backend and dtype it runs the fused ops (conv+BN+ReLU in training and eval, the block
tail with a downsample BN, conv+bias+residual+ReLU) and a small fused ResNet (stem, basic blocks
with and without downsample, a bottleneck) for one training step and one eval pass, and compares
outputs, every gradient and the running statistics with the reference backend on the same inputs.
Exit status 1 if anything exceeds the tolerance table.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

_CPU_DTYPES = ("float32", "float64")
_CUDA_DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present")
    parser.add_argument("--dtype", action="append", choices=["float64", "float32", "bfloat16", "float16"],
                        help="dtypes to check (repeatable; default: float32 and float64 on CPU, "
                             "float32, bfloat16, float16 on CUDA)")
    parser.add_argument("--backend", action="append", help="backends to check (default: every available one)")


def _small_resnet() -> nn.Module:
    from fused_resnet import fuse, models

    def ds(cin, cout, stride):
        return nn.Sequential(models.conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))

    model = nn.Sequential()
    model.conv1, model.bn1, model.relu = nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
    model.layer1 = nn.Sequential(models.BasicBlock(8, 8), models.BasicBlock(8, 16, 2, ds(8, 16, 2)))
    model.layer2 = nn.Sequential(models.Bottleneck(16, 8, 2, ds(16, 32, 2)))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial affine parameters and running statistics
            nn.init.uniform_(m.weight, 0.5, 1.5), nn.init.uniform_(m.bias, -0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return fuse(model)


def _outputs(model: nn.Module, x: torch.Tensor, train: bool) -> dict[str, torch.Tensor]:
    """Output, gradients and buffers after one forward/backward of ``model`` in the given mode."""
    model.train(train)
    x = x.clone().requires_grad_()
    out = model(x)
    out.float().square().mean().backward()
    results = {"output": out, "grad input": x.grad}
    results.update({f"grad {n}": p.grad for n, p in model.named_parameters()})
    results.update({f"buffer {n}": b for n, b in model.named_buffers() if b.is_floating_point()})
    return results


def _op_cases(device, dtype):
    from fused_resnet import ops

    def conv_bn_relu(train):
        def run(x, w, bn_w, bn_b):
            rm, rv = running[0].clone(), running[1].clone()
            out = ops.conv_bn_relu(x, w, bn_w, bn_b, rm, rv, torch.zeros((), dtype=torch.long, device=device),
                                   stride=2, padding=1, training=train)
            return out, rm, rv
        return run

    def block_tail(y, r, s, t, rs, rt):
        return ops.bn_add_relu(ops.DeferredBN(y, s, t), ops.DeferredBN(r, rs, rt))

    def conv_bias_act(x, w, bias, res):
        return ops.conv_bias_act(x, w, bias, res, stride=1, padding=1, relu=True)

    def t(*shape, positive=False, stat=False):
        v = torch.randn(*shape, device=device, dtype=torch.float32 if stat and dtype != torch.float64 else dtype)
        return v.abs() + 0.5 if positive else v

    x = t(4, 5, 11, 9).contiguous(memory_format=torch.channels_last)
    running = (t(7, stat=True), t(7, positive=True, stat=True))
    conv_args = (x, t(7, 5, 3, 3), t(7, stat=True), t(7, stat=True))
    return {
        "conv_bn_relu train": (conv_bn_relu(True), conv_args),
        "conv_bn_relu eval": (conv_bn_relu(False), conv_args),
        "bn_add_relu (downsample BN)": (block_tail, (t(3, 6, 7, 5), t(3, 6, 7, 5)) + tuple(t(6, stat=True) for _ in range(4))),
        "conv_bias_act": (conv_bias_act, (t(2, 4, 8, 6), t(6, 4, 3, 3), t(6, stat=True), t(2, 6, 8, 6))),
    }


def _run_op(fn, args):
    args = [a.clone().requires_grad_() for a in args]
    out = fn(*args)
    extra = {}
    if isinstance(out, tuple):  # (output, running_mean, running_var)
        out, extra = out[0], {"running_mean": out[1], "running_var": out[2]}
    out.float().square().mean().backward()
    return {"output": out, **extra, **{f"grad arg{i}": a.grad for i, a in enumerate(args) if a.grad is not None}}


def _compare(name, backend, got, want, dtype, rows, ran) -> bool:
    from fused_resnet._tolerances import relative_error, tolerance

    worst_key, worst = max(((k, relative_error(got[k], want[k])) for k in want), key=lambda kv: kv[1])
    # Whole-model results accumulate rounding over layers: 10x the per-op bar.
    limit = tolerance(dtype) * (10 if name.startswith("model") else 1)
    ok = worst <= limit
    rows.append((backend, str(dtype).removeprefix("torch."), name, worst_key, worst, limit, ok,
                 "+".join(sorted({b for _, b in ran}))))
    return ok


def run(args) -> int:
    import fused_resnet

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fused_resnet check: no CUDA device visible")
        return 2
    # The reference is the oracle: compare in full fp32 (no tf32) so that only the kernels differ.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    names = args.backend or [b for b in fused_resnet.backends(device.type) if b != "reference"]
    dtypes = [getattr(torch, d) for d in (args.dtype or (_CUDA_DTYPES if device.type == "cuda" else _CPU_DTYPES))]
    rows: list[tuple] = []
    all_ok = True
    for dtype in dtypes:
        torch.manual_seed(0)
        cases = _op_cases(device, dtype)
        base = _small_resnet().to(device=device, dtype=dtype, memory_format=torch.channels_last)
        x = torch.randn(4, 3, 33, 31, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        for backend in names:
            for case, (fn, case_args) in cases.items():
                with fused_resnet.use_backend("reference"):
                    want = _run_op(fn, case_args)
                with fused_resnet.use_backend(backend), fused_resnet.trace_dispatch() as ran:
                    got = _run_op(fn, case_args)
                all_ok &= _compare(case, backend, got, want, dtype, rows, ran)
            for train in (True, False):
                with fused_resnet.use_backend("reference"):
                    want = _outputs(copy.deepcopy(base), x, train)
                with fused_resnet.use_backend(backend), fused_resnet.trace_dispatch() as ran:
                    got = _outputs(copy.deepcopy(base), x, train)
                all_ok &= _compare(f"model {'train step' if train else 'eval'}", backend, got, want, dtype, rows, ran)
    if not rows:
        print(f"fused_resnet check: no backend besides the reference is available on {device.type} "
              "(see `python -m fused_resnet info`)")
        return 0
    print(f"{'backend':<9} {'dtype':<9} {'case':<28} {'worst tensor':<32} {'rel. L2':>9} {'limit':>7}  result  "
          "kernels ran on")
    for backend, dtype, case, key, err, limit, ok, ran in rows:
        print(f"{backend:<9} {dtype:<9} {case:<28} {key[:32]:<32} {err:9.2e} {limit:7.0e}  {'pass' if ok else 'FAIL':<6}  "
              f"{ran}")
    print("(a backend whose kernels do not cover a dtype runs the reference there: see the last column)")
    print("all passed" if all_ok else "FAILURES above")
    return 0 if all_ok else 1

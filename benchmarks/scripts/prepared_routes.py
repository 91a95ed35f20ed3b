"""Per-conv timing of the native backend's serving routes (``backends/native/_onednn.py``) on the
convs of a real model, fused and prepared, as the model calls them: oneDNN's prepacked conv, ATen's
conv with the bias inside, the 1x1 conv as one GEMM, the generic op, and eager's conv + bias + act;
each route's min-of-rounds time (interleaved) and the route the static rule chose.

    python benchmarks/scripts/prepared_routes.py tv:mobilenet_v2 [--channels-last] [--batch 1]
        [--image 224] [--rounds 30]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import fused_resnet
from fused_resnet import _activation
from fused_resnet.backends.native import _onednn
from fused_resnet.inference import _conv_bias_act

ROUTES = ("onednn", "aten", "gemm", "generic", "eager")


def build(spec: str) -> torch.nn.Module:
    lib, name = spec.split(":")
    if lib == "tv":
        import torchvision

        return getattr(torchvision.models, name)()
    import timm

    return timm.create_model(name, pretrained=False)


def calls_of(model: torch.nn.Module, x: torch.Tensor) -> list:
    """(PackedConv, input, residual, act) of every prepared call of one forward."""
    calls, original = [], _onednn.PackedConv.__call__

    def record(self, inp, residual, act):
        calls.append((self, inp.clone(), None if residual is None else residual.clone(), act))
        return original(self, inp, residual, act)

    _onednn.PackedConv.__call__ = record
    try:
        with torch.inference_mode():
            model(x)
    finally:
        _onednn.PackedConv.__call__ = original
    return calls


def runners(p: _onednn.PackedConv, x, r, act) -> dict:
    """The routes that can take this call, as zero-argument functions."""
    padding, stride, dilation, groups = p.conv

    def eager():  # what an unfused model runs: conv, bias (the BN's shift), residual, activation
        out = torch.conv2d(x, p.dense, None, *p.aten_conv) + p.bias[:, None, None]
        return _activation.apply(out if r is None else out + r, act, inplace=True)

    run = {"generic": lambda: _conv_bias_act(x, p.dense, p.bias, r, stride, padding, dilation, groups, act),
           "eager": eager}
    if p._can_onednn(x, r) and (r is None or act in _onednn._BINARY_ACTS):
        run["onednn"] = lambda: p._run("onednn", x, r, act)
    if p._can_onednn(x, r) and r is None:
        run["aten"] = lambda: p._run("aten", x, r, act)
    if p._can_onednn(x, r) and p._can_gemm(x):
        run["gemm"] = lambda: p._run("gemm", x, r, act)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = build(args.model).eval().to(memory_format=fmt)
    prepared = fused_resnet.prepare_for_inference(fused_resnet.fuse(copy.deepcopy(model)))
    x = torch.randn(args.batch, 3, args.image, args.image).to(memory_format=fmt)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.model}, batch {args.batch}, "
          f"{args.image}px, {'channels_last' if args.channels_last else 'NCHW'}; us per call, min of {args.rounds}")
    print("| input | Cout | kernel | groups | residual | act | rule | " + " | ".join(ROUTES) + " | fastest |")
    print("|---" * (8 + len(ROUTES)) + "|")
    totals = dict.fromkeys(ROUTES + ("rule", "fastest"), 0.0)
    with torch.inference_mode():
        for p, inp, r, act in calls_of(prepared, x):
            route = p.routes.get((inp.shape, inp.stride(), inp.dtype, None if r is None else r.dtype))
            run = runners(p, inp, r, act)
            best = dict.fromkeys(run, float("inf"))
            for fn in run.values():
                fn()
            for _ in range(args.rounds):
                for name, fn in run.items():
                    start = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - start)
            us = {k: v * 1e6 for k, v in best.items()}
            ruled = us[route if route in us and route is not None else "generic"]
            fastest = min((k for k in us if k != "eager"), key=us.__getitem__)
            for k, v in us.items():
                totals[k] += v
            totals["rule"] += ruled
            totals["fastest"] += us[fastest]
            cells = " | ".join(f"{us[k]:.0f}" if k in us else "-" for k in ROUTES)
            print(f"| {tuple(inp.shape)} | {p.dense.shape[0]} | {tuple(p.kernel)} | {p.conv[3]} | {r is not None} "
                  f"| {_activation.NAMES[act]} | {route or 'generic'} | {cells} | {fastest} |")
    print(f"sum over the calls (us): rule {totals['rule']:.0f}, fastest {totals['fastest']:.0f}, "
          f"eager conv + bias + act {totals['eager']:.0f}")


if __name__ == "__main__":
    main()

"""ResNet-20 (channels_last or NCHW), eval at batch 1, one thread: the fused + prepared model, eager,
the fused model's prepared convs called in its order with no module code around them ("prepared"),
and the same convolutions as bare ops ("raw"): microseconds of thread time, best of 9 rounds.

    PYTHONPATH=. python benchmarks/results/2026-12-02-cpu-host5/replay_resnet20.py cl|nchw
"""
import time

CLK = time.thread_time


def bench(fns, rounds=15, number=200):
    best = dict.fromkeys(fns, float("inf"))
    for f in fns.values():
        for _ in range(20): f()
    for _ in range(rounds):
        for k, f in fns.items():
            t = CLK()
            for _ in range(number): f()
            best[k] = min(best[k], (CLK() - t) / number * 1e6)
    return {k: round(v, 1) for k, v in best.items()}


import sys
import copy, torch
import fused_resnet
from fused_resnet.small_resnet import small_resnet
from fused_resnet.inference import _conv_bias_act
torch.set_num_threads(1)
torch.manual_seed(0)
cl = torch.channels_last if sys.argv[1] == "cl" else torch.contiguous_format
eager = small_resnet(fused=False, blocks=(3, 3, 3)).to(memory_format=cl).eval()
fe = fused_resnet.prepare_for_inference(fused_resnet.fuse(copy.deepcopy(eager)))
x1 = torch.randn(1, 3, 32, 32).to(memory_format=cl)
# the fused forward's convs, in order: (prepared conv, residual source, act)
blocks = [b for layer in (fe.layer1, fe.layer2, fe.layer3) for b in layer]
stem = fe.conv1._prepared[0]
def replay_prepared():
    h = stem(x1, None, 1)
    for b in blocks:
        ps = b._prepared
        if len(ps) == 3:
            sc = ps[0](h, None, 0); o = ps[1](h, None, 1); h = ps[2](o, sc, 1)
        else:
            o = ps[0](h, None, 1); h = ps[1](o, h, 1)
    return fe.fc(torch.flatten(fe.avgpool(h), 1)) if hasattr(fe, "fc") else h
def raw(p, x, r, a):
    if r is None:
        return torch.conv2d(x, p.weight, p.bias, p.conv_args[0], p.conv_args[1]).relu_() if a else torch.conv2d(x, p.weight, p.bias, p.conv_args[0], p.conv_args[1])
    return _conv_bias_act(x, p.weight, p.bias, r, *p.conv_args, a)
def replay_raw():
    h = raw(stem, x1, None, 1)
    for b in blocks:
        ps = b._prepared
        if len(ps) == 3:
            sc = raw(ps[0], h, None, 0); o = raw(ps[1], h, None, 1); h = raw(ps[2], o, sc, 1)
        else:
            o = raw(ps[0], h, None, 1); h = raw(ps[1], o, h, 1)
    return h
with torch.inference_mode():
    for _ in range(2):
        print(bench(dict(fused=lambda: fe(x1), eager=lambda: eager(x1), prepared=replay_prepared, raw=replay_raw), rounds=9, number=100))

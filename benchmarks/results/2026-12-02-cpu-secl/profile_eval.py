"""torch.profiler key_averages of eager vs fuse + prepare_for_inference, batch 1, 224 px, 10 forwards.

    PYTHONPATH=. python benchmarks/results/2026-12-02-cpu-secl/profile_eval.py timm:seresnet50 2 cl [shapes]

(arguments: model spec as fuse_models_eval.py's, threads, ``cl`` for channels_last or ``nchw``, and
``shapes`` to group by input shape.)
"""
import copy
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import fused_resnet

sys.path.insert(0, "benchmarks/scripts")
from fuse_models_eval import build

spec, threads, layout = sys.argv[1], int(sys.argv[2]), sys.argv[3]
by_shape = len(sys.argv) > 4
torch.set_num_threads(threads)
fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
torch.manual_seed(0)
eager = build(spec).eval().to(memory_format=fmt)
prepared = fused_resnet.prepare_for_inference(fused_resnet.fuse(copy.deepcopy(eager)))
x = torch.randn(1, 3, 224, 224).to(memory_format=fmt)
with torch.inference_mode():
    for m in (eager, prepared):
        for _ in range(5):
            m(x)
    for name, m in (("eager", eager), ("prepared", prepared)):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as p:
            for _ in range(10):
                m(x)
        print("=====", name)
        print(p.key_averages(group_by_input_shape=by_shape).table(sort_by="self_cpu_time_total", row_limit=30,
                                                                  max_name_column_width=40,
                                                                  max_shapes_column_width=70))

#!/usr/bin/env bash
# The measurements of this folder, from the repository root, on a quiet machine (nothing else running).
set -u
OUT=benchmarks/results/2026-12-02-cpu-avx512
export PYTHONPATH=.
PY=${PY:-python}
{ date -u; uptime; git rev-parse HEAD; $PY -c "import torch, platform; print(torch.__version__, torch.backends.cpu.get_cpu_capability(), platform.python_version())"; lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-160; } > $OUT/env.txt
for i in 1 2 3; do echo "### run $i (load average: $(cut -d' ' -f1-3 /proc/loadavg))"; $PY benchmarks/scripts/host_cost.py --rounds 15 --calls 600; done > $OUT/host_cost.txt 2>&1
M="tv:resnet50 tv:mobilenet_v2 tv:regnet_y_400mf timm:resnet18 timm:efficientnet_b0 timm:regnetx_002 tv:densenet121"
{
  $PY benchmarks/scripts/route_bounds.py --threads 1 --models cifar:resnet20 --channels-last
  $PY benchmarks/scripts/route_bounds.py --threads 1 --models cifar:resnet20
  $PY benchmarks/scripts/route_bounds.py --threads 2 --models cifar:resnet20 --channels-last
  $PY benchmarks/scripts/route_bounds.py --threads 2 --models cifar:resnet20
  $PY benchmarks/scripts/route_bounds.py --threads 2 --image 224 --channels-last --models $M
  $PY benchmarks/scripts/route_bounds.py --threads 2 --image 224 --models $M
  $PY benchmarks/scripts/route_bounds.py --threads 2 --image 64 --channels-last --models $M
} > $OUT/route_bounds.txt 2>&1

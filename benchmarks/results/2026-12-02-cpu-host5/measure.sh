#!/bin/bash
# Quiet-machine measurements for issues #12 and #13 (run from a tree with the extension built for venv214).
set -u
TREE=${1:-/work/main}
OUT=${2:-/work/measure/out}
PY=/work/venv214/bin/python
mkdir -p $OUT
cd $TREE
export PYTHONPATH=$TREE
{ date; uptime; git -C $TREE log --oneline | head -1; $PY -c "import torch, torchvision, timm; print(torch.__version__, torchvision.__version__, timm.__version__)"; lscpu | grep -E "Model name|^CPU\(s\)"; } > $OUT/env.txt 2>&1
for i in 1 2 3; do echo "### run $i ($(uptime | sed 's/.*load/load/'))"; $PY benchmarks/scripts/host_cost.py --rounds 15 --calls 600 2>&1 | grep -v "^ERROR\|gpuGet"; done > $OUT/host_cost.txt
MODELS="tv:resnet50 tv:resnext50_32x4d tv:densenet121 tv:mobilenet_v2 tv:regnet_y_400mf timm:resnet18 timm:resnet50 timm:resnet50d timm:seresnet50 timm:resnet26t timm:regnetx_002 timm:efficientnet_b0 timm:dla34"
for i in 1 2; do $PY benchmarks/scripts/fuse_models_eval.py --models $MODELS --batches 1 --image 224 --rounds 11 --prepared-only 2>&1 | grep -v "^ERROR\|gpuGet" > $OUT/eval_nchw_run$i.txt; done
$PY benchmarks/scripts/fuse_models_eval.py --models $MODELS --batches 1 --image 224 --rounds 11 --prepared-only --channels-last 2>&1 | grep -v "^ERROR\|gpuGet" > $OUT/eval_cl.txt
for i in 1 2 3 4 5 6 7; do echo "### run $i ($(uptime | sed 's/.*load/load/'))"; $PY -m fused_resnet train --compare --no-progress --out /tmp/tc 2>&1 | grep -v "^ERROR\|gpuGet"; done > $OUT/train_compare.txt
$PY benchmarks/scripts/train_parts.py --models 2>&1 | grep -v "^ERROR\|gpuGet" > $OUT/train_parts_models.txt
{ date; uptime; } >> $OUT/env.txt

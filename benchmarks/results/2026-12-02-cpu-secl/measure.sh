#!/bin/bash
# alternate base (main ecbc9a4) and new (s7-secl) trees; each line: tree threads row
OUT=$1; REPS=${2:-3}; ROUNDS=${3:-21}
for rep in $(seq $REPS); do
 for t in 2 1; do
  for m in timm:seresnet50 tv:densenet121; do
   for tree in base new; do
    dir=/tmp/secl/base; [ $tree = new ] && dir=/work/wt-secl
    row=$(cd $dir && PYTHONPATH=$dir /work/venv214/bin/python benchmarks/scripts/fuse_models_eval.py --models $m --batches 1 --image 224 --rounds $ROUNDS --prepared-only --channels-last --threads $t 2>&1 | grep "^| [a-z]*:")
    echo "$tree t$t load=$(cut -d' ' -f1 /proc/loadavg) $row" >> $OUT
   done
  done
 done
done
echo done >> $OUT

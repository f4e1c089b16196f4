#!/bin/bash
# A/B, alternating: the tree before this session (scratch/old_tree) and now, ours only (eager peer, needed by the CLI)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
ROOT=$PWD
for tree in old new old new; do
  if [ $tree = old ]; then dir=$ROOT/scratch/old_tree; else dir=$ROOT; fi
  (cd $dir && PYTHONPATH=$dir timeout 85 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers eager --reps 15 > $OUT/ab_$tree.$RANDOM.log 2>&1; echo "$tree rc=$?")
  nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader
  grep -h "^  ours" $(ls -t $OUT/ab_*.log | head -1)
done

#!/bin/bash
# constant variants of HEAD (49b97f7): the LM head's loss chunk (1024 -> 2048, 4096 rows) and the norm backward's rows a block (8 -> 16)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
ROOT=$PWD
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv,noheader
for tree in base_tree v_c2048 v_c4096 v_nr16 base_tree v_c2048; do
  dir=$ROOT/scratch/$tree
  (cd $dir && PYTHONPATH=$dir timeout 85 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers eager --reps 15 > $OUT/ab_$tree.$RANDOM.log 2>&1; echo "$tree train rc=$?")
  grep -h "^  ours" $(ls -t $OUT/ab_*.log | head -1)
done

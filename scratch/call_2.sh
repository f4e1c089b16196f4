#!/bin/bash
# A/B of the L2 prefetch of the in-place epilogues' second 64 rows: base (HEAD before) vs new, alternating
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
ROOT=$PWD
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader
for tree in base new base new; do
  if [ $tree = base ]; then dir=$ROOT/scratch/base_tree; else dir=$ROOT; fi
  (cd $dir && PYTHONPATH=$dir timeout 60 python3 bench/bench_compute.py --only model-gemms > $OUT/gemms_$tree.$RANDOM.log 2>&1; echo "$tree gemms rc=$?")
  grep -h -A1 "down dX\|o fwd\|down fwd" $(ls -t $OUT/gemms_*.log | head -1) | grep -v "^--"
done
PYTHONPATH=$ROOT timeout 90 python3 scratch/variant_probe.py qkv forward '{"g8": {}, "g1": {"group_m": 1}, "g4": {"group_m": 4}, "g16": {"group_m": 16}, "s5": {"stages": 5}}' > $OUT/qkv_variants.log 2>&1; echo "qkv variants rc=$?"
grep -h "^---\|qkv fwd" $OUT/qkv_variants.log
for tree in base new base new; do
  if [ $tree = base ]; then dir=$ROOT/scratch/base_tree; else dir=$ROOT; fi
  (cd $dir && PYTHONPATH=$dir timeout 85 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers eager --reps 15 > $OUT/ab_$tree.$RANDOM.log 2>&1; echo "$tree train rc=$?")
  nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader
  grep -h "^  ours" $(ls -t $OUT/ab_*.log | head -1)
done

#!/bin/bash
# A/B of the deferred wait_group.read in the in-place epilogues: base (HEAD) vs new, alternating
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
ROOT=$PWD
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader
PYTHONPATH=$ROOT timeout 200 python3 -m pytest -p no:cacheprovider -q tests/test_gemm_tc_cuda.py -k "swiglu or residual" > $OUT/tests.log 2>&1; echo "tests rc=$?"; tail -3 $OUT/tests.log
for tree in base new base new; do
  if [ $tree = base ]; then dir=$ROOT/scratch/base_tree; else dir=$ROOT; fi
  (cd $dir && PYTHONPATH=$dir timeout 60 python3 bench/bench_compute.py --only model-gemms > $OUT/gemms_$tree.$RANDOM.log 2>&1; echo "$tree gemms rc=$?")
  grep -h -A1 "down dX\|o fwd\|down fwd" $(ls -t $OUT/gemms_*.log | head -1) | grep -v "^--"
done
for tree in base new base new; do
  if [ $tree = base ]; then dir=$ROOT/scratch/base_tree; else dir=$ROOT; fi
  (cd $dir && PYTHONPATH=$dir timeout 85 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers none --reps 15 > $OUT/ab_$tree.$RANDOM.log 2>&1; echo "$tree train rc=$?")
  grep -h "^  ours" $(ls -t $OUT/ab_*.log | head -1)
done

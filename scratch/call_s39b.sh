#!/bin/bash
# host-side overlap: the grouping as a host step during the forward, pinned staging; A/B against HEAD
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
ROOT=$PWD
PYTHONPATH=$ROOT timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/test_runtime_cuda.py tests/test_plan_cuda.py tests/test_model_cuda.py tests/test_model_bf16_cuda.py > $OUT/pytest_quick.log 2>&1; echo "pytest rc=$?"; tail -3 $OUT/pytest_quick.log
for v in new base new base; do
  if [ $v = base ]; then cd $ROOT/scratch/base_tree; else cd $ROOT; fi
  PYTHONPATH=$PWD timeout 100 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers none --reps 10 > $OUT/ab_$v.$RANDOM.log 2>&1; echo "$v rc=$?"
  grep -h "^  ours" $(ls -t $OUT/ab_*.log | head -1)
done

#!/bin/bash
# GPU tests of the tree, then A/B: base (HEAD 49b97f7) vs new (batched dgamma column sum), alternating
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
ROOT=$PWD
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv,noheader
PYTHONPATH=$ROOT timeout 300 python3 -m pytest -m cuda --deselect tests/test_distributed_multi_gpu.py -p no:cacheprovider -q -x > $OUT/pytest_cuda.log 2>&1; echo "pytest rc=$?"
tail -5 $OUT/pytest_cuda.log
for tree in base new base new; do
  if [ $tree = base ]; then dir=$ROOT/scratch/base_tree; else dir=$ROOT; fi
  (cd $dir && PYTHONPATH=$dir timeout 85 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers eager --reps 15 > $OUT/ab_$tree.$RANDOM.log 2>&1; echo "$tree train rc=$?")
  grep -h "^  ours" $(ls -t $OUT/ab_*.log | head -1)
done

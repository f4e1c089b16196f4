#!/bin/bash
# residual-in-GEMM: new GPU tests, model GPU tests, step A/B against the tree before (scratch/old_tree)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
ROOT=$PWD
export PYTHONPATH=$ROOT
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > $OUT/gpu.txt 2>&1
timeout 120 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_gemm_tc_cuda.py tests/test_gemm_attention_cuda.py -k "residual" > $OUT/t_residual.log 2>&1; echo "rc=$?" >> $OUT/t_residual.log
tail -3 $OUT/t_residual.log
timeout 240 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_model_bf16_cuda.py tests/test_model_cuda.py tests/test_hf_parity_cuda.py > $OUT/t_model.log 2>&1; echo "rc=$?" >> $OUT/t_model.log
tail -3 $OUT/t_model.log
for tree in old new; do
  if [ $tree = old ]; then cd $ROOT/scratch/old_tree; export PYTHONPATH=$PWD; else cd $ROOT; export PYTHONPATH=$ROOT; fi
  timeout 200 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers eager --reps 10 > $OUT/bench_$tree.$RANDOM.log 2>&1
  echo "$tree rc=$?"
done
cd $ROOT; grep -h "ours\|x1024\|x2048" $OUT/bench_*.log | head -40

#!/bin/bash
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
ROOT=$PWD
(cd scratch/old_tree && PYTHONPATH=$PWD timeout 170 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers eager --reps 10 --breakdown > $OUT/bench_old.log 2>&1; echo "old rc=$?")
PYTHONPATH=$ROOT timeout 340 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers compile --reps 10 --breakdown --json $OUT/train.json > $OUT/bench_new.log 2>&1; echo "new rc=$?"
grep -E "^  ours|where the step|rmsnorm |gemm_wgmma  |o_proj forward|down_proj forward|attention_wgmma_bwd_kv  " $OUT/bench_old.log
echo ===
grep -E "^  ours|where the step|rmsnorm |gemm_wgmma  |o_proj forward|down_proj forward|attention_wgmma_bwd_kv  " $OUT/bench_new.log
tail -14 $OUT/bench_new.log

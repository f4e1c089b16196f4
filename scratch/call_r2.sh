#!/bin/bash
# the step against torch.compile with the breakdown (README figures), then attention rows vs SDPA
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
git log --oneline -1 > $OUT/tree.txt 2>&1
timeout 330 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers compile --reps 10 --breakdown --json $OUT/train.json > $OUT/bench_train.log 2>&1; echo "train rc=$?"
timeout 230 python3 bench/bench_compute.py --only attention > $OUT/bench_attn.log 2>&1; echo "attn rc=$?"
tail -60 $OUT/bench_train.log | grep -v "^\s*$" | tail -45
grep -A30 "== compute-bound" $OUT/bench_attn.log

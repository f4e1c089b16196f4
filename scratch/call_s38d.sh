#!/bin/bash
# the big plain GEMMs as 128 x 256 tiles shared by both warpgroups, in the power-capped step
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
W='{"pingpong": false, "block_n": 256, "stages": 4, "split_tail": false}'
X='{"pingpong": false, "block_n": 256, "stages": 4, "split_tail": false, "tma_store": false}'
C="{\"head.grad_weight\": $W, \"gate_up.grad_weight\": $W, \"down.grad_weight\": $W}"
D="{\"head.grad_weight\": $W, \"gate_up.grad_weight\": $W, \"down.grad_weight\": $W, \"head.grad_input\": $X, \"gate_up.grad_input\": $X}"
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw --format=csv,noheader -lms 250 > $OUT/clocks.csv &
SMI=$!
for v in base C D base C D; do
  case $v in base) GV='{}';; C) GV=$C;; D) GV=$D;; esac
  date +%T.%N
  GEMM_VARIANT="$GV" timeout 80 python3 scratch/gemm_variant.py --shapes qwen2-0.5b:8x1024 --precisions bf16 --peers none --reps 10 > $OUT/v_$v.$RANDOM.log 2>&1; echo "$v rc=$?"
  grep -h "^  ours" $(ls -t $OUT/v_*.log | head -1)
done
GEMM_VARIANT="$D" timeout 80 python3 scratch/gemm_variant.py --shapes qwen2-0.5b:8x1024 --precisions bf16 --peers none --reps 5 --breakdown > $OUT/d_breakdown.log 2>&1
kill $SMI
grep -A16 "by module" $OUT/d_breakdown.log

#!/bin/bash
# q/k/v and o GEMMs with 64-column tiles (8 stages) in the step, alternating with the tree as it is
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
V1='{"qkv.forward": {"block_n": 64, "stages": 8}, "qkv.grad_input": {"block_n": 64, "stages": 8}, "o.forward": {"block_n": 64, "stages": 8}, "o.grad_input": {"block_n": 64, "stages": 8}}'
V2='{"qkv.forward": {"block_n": 64, "stages": 8}, "qkv.grad_input": {"block_n": 64, "stages": 8}, "o.forward": {"block_n": 64, "stages": 8}, "o.grad_input": {"block_n": 64, "stages": 8}, "qkv.grad_weight": {"block_n": 64, "stages": 8}, "o.grad_weight": {"block_n": 64, "stages": 8}}'
for v in base V1 V2 base V1 V2; do
  case $v in base) GV='{}';; V1) GV=$V1;; V2) GV=$V2;; esac
  GEMM_VARIANT="$GV" timeout 80 python3 scratch/gemm_variant.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers none --reps 10 > $OUT/v_$v.$RANDOM.log 2>&1; echo "$v rc=$?"
  grep -h "^  ours" $(ls -t $OUT/v_*.log | head -1)
done
GEMM_VARIANT="$V2" timeout 80 python3 scratch/gemm_variant.py --shapes qwen2-0.5b:8x1024 --precisions bf16 --peers none --reps 5 --breakdown > $OUT/v2_breakdown.log 2>&1
grep -A16 "by module" $OUT/v2_breakdown.log

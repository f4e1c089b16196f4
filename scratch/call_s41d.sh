#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
A="--shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers none --reps 10"
run() { mode=$1; tag=$2; PDL_MODE=$mode PTXGEN_CACHE_DIR=/tmp/cache_$mode timeout 150 python3 scratch/pdl_variant.py $A > $OUT/$tag.log 2>&1; echo "$tag rc=$?"; grep '^  ours' $OUT/$tag.log; }
run waitonly w1; run plain p1; run noedges n1; run waitonly w2; run plain p2

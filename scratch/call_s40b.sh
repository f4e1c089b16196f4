#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
A="--shapes qwen2-0.5b:8x1024 --precisions bf16 --peers none --reps 10"
run() { tag=$1; shift; timeout 150 "$@" $A > $OUT/$tag.log 2>&1; echo "$tag rc=$? $(grep -m1 '^  ours' $OUT/$tag.log)"; }
run base1 python3 bench/bench_train.py
HALF=b PTXGEN_CACHE_DIR=$(mktemp -d) run halfb python3 scratch/half_b.py --breakdown
HALF=a PTXGEN_CACHE_DIR=$(mktemp -d) run halfa python3 scratch/half_b.py
run base2 python3 bench/bench_train.py --breakdown
grep -A16 "GEMMs by module" $OUT/halfb.log; grep -A16 "GEMMs by module" $OUT/base2.log

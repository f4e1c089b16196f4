#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
timeout 150 python3 -m pytest tests/test_gemm_tc_cuda.py -k "cluster" -p no:cacheprovider -q > $OUT/pytest_cluster.log 2>&1; echo "pytest rc=$?"; grep -E "passed|failed|FAILED" $OUT/pytest_cluster.log
timeout 100 python3 scratch/cluster_diag.py 2>&1 | tail -14
A="--shapes qwen2-0.5b:8x1024 --precisions bf16 --peers none --reps 10"
run() { tag=$1; shift; timeout 120 "$@" $A > $OUT/$tag.log 2>&1; echo "$tag rc=$? $(grep -m1 '^  ours' $OUT/$tag.log)"; tail -3 $OUT/$tag.log | grep -i error; }
GEMM_VARIANT='{"qkv.forward": {"cluster": 2}, "qkv.grad_input": {"cluster": 2}, "qkv.grad_weight": {"cluster": 2}, "o.forward": {"cluster": 2}, "o.grad_input": {"cluster": 2}, "o.grad_weight": {"cluster": 2}, "gate_up.forward": {"cluster": 2}, "gate_up.grad_input": {"cluster": 2}, "gate_up.grad_weight": {"cluster": 2}, "down.forward": {"cluster": 2}, "down.grad_input": {"cluster": 2}, "down.grad_weight": {"cluster": 2}, "head.forward": {"cluster": 2}, "head.grad_input": {"cluster": 2}, "head.grad_weight": {"cluster": 2}}' run all python3 scratch/gemm_variant.py --breakdown
run base python3 bench/bench_train.py
grep -A16 "GEMMs by module" $OUT/all.log

#!/bin/bash
# next session, first call (after: git apply scratch/cluster_multicast.patch): the cluster GEMMs' correctness, then
# the step with clusters (the patch's default) against single blocks (GEMM_VARIANT), alternating
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
timeout 30 python3 scratch/smem_base_probe.py 2>&1 | tail -2
timeout 150 python3 -m pytest tests/test_gemm_tc_cuda.py -k "cluster" -p no:cacheprovider -q > $OUT/pytest_cluster.log 2>&1; echo "pytest rc=$?"; grep -E "passed|failed|FAILED" $OUT/pytest_cluster.log
A="--shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers none --reps 10"
run() { tag=$1; shift; timeout 150 "$@" $A > $OUT/$tag.log 2>&1; echo "$tag rc=$?"; grep '^  ours' $OUT/$tag.log; }
GEMM_VARIANT='{"qkv.forward": {"cluster": 1}, "qkv.grad_input": {"cluster": 1}, "qkv.grad_weight": {"cluster": 1}, "o.forward": {"cluster": 1}, "o.grad_input": {"cluster": 1}, "o.grad_weight": {"cluster": 1}, "gate_up.forward": {"cluster": 1}, "gate_up.grad_input": {"cluster": 1}, "gate_up.grad_weight": {"cluster": 1}, "down.forward": {"cluster": 1}, "down.grad_input": {"cluster": 1}, "down.grad_weight": {"cluster": 1}, "head.forward": {"cluster": 1}, "head.grad_input": {"cluster": 1}, "head.grad_weight": {"cluster": 1}}' run single1 python3 scratch/gemm_variant.py
run cluster1 python3 bench/bench_train.py --breakdown
GEMM_VARIANT='{"qkv.grad_weight": {"cluster": 1}, "o.grad_weight": {"cluster": 1}, "down.grad_weight": {"cluster": 1}}' run odd_single python3 scratch/gemm_variant.py
GEMM_VARIANT='{"qkv.forward": {"cluster": 1}, "qkv.grad_input": {"cluster": 1}, "qkv.grad_weight": {"cluster": 1}, "o.forward": {"cluster": 1}, "o.grad_input": {"cluster": 1}, "o.grad_weight": {"cluster": 1}, "gate_up.forward": {"cluster": 1}, "gate_up.grad_input": {"cluster": 1}, "gate_up.grad_weight": {"cluster": 1}, "down.forward": {"cluster": 1}, "down.grad_input": {"cluster": 1}, "down.grad_weight": {"cluster": 1}, "head.forward": {"cluster": 1}, "head.grad_input": {"cluster": 1}, "head.grad_weight": {"cluster": 1}}' run single2 python3 scratch/gemm_variant.py --breakdown
run cluster2 python3 bench/bench_train.py
grep -A16 "GEMMs by module" $OUT/cluster1.log $OUT/single2.log

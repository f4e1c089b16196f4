#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
timeout 300 python3 -m pytest -m cuda --deselect tests/test_distributed_multi_gpu.py -p no:cacheprovider -q -rs > $OUT/pytest_cuda.log 2>&1; echo "pytest rc=$?"
tail -5 $OUT/pytest_cuda.log
timeout 120 python3 -m model.cli contracts check --gpu-only > $OUT/contracts.log 2>&1; echo "contracts rc=$?"
tail -3 $OUT/contracts.log
timeout 120 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers none --reps 10 > $OUT/bench.log 2>&1; echo "bench rc=$?"
tail -15 $OUT/bench.log

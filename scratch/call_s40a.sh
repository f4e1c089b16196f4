#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
git log --oneline -1 > $OUT/tree.txt 2>/dev/null
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/smi.txt
timeout 280 python3 -m pytest -m cuda --deselect tests/test_distributed_multi_gpu.py -p no:cacheprovider -q -rs > $OUT/pytest_cuda.log 2>&1; echo "pytest rc=$?"
tail -4 $OUT/pytest_cuda.log
timeout 90 python3 -m model.cli contracts check --gpu-only > $OUT/contracts.log 2>&1; echo "contracts rc=$?"; tail -2 $OUT/contracts.log
timeout 40 python3 scratch/host_probe2.py 8 1024 2>&1 | tail -1
timeout 120 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 --precisions bf16 --peers none --reps 10 --breakdown > $OUT/bench.log 2>&1; echo "bench rc=$?"
head -60 $OUT/bench.log

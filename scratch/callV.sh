#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
timeout 250 python3 -m pytest -q -m cuda --deselect tests/test_distributed_multi_gpu.py -p no:cacheprovider 2>&1 | tail -4 | tee $OUT/pytest.txt
timeout 260 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers compile --reps 10 --breakdown > $OUT/bench.txt 2>&1
echo "bench rc=$?"; grep -A12 "== training step" $OUT/bench.txt
timeout 80 python3 -m model.cli contracts check --gpu-only > $OUT/contracts.txt 2>&1; echo "contracts rc=$?"; tail -3 $OUT/contracts.txt

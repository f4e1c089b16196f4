#!/bin/bash
# the README's table (ours vs torch.compile, both shapes, breakdown) and the GPU contracts, tree af9ccff
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
ROOT=$PWD
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader
PYTHONPATH=$ROOT timeout 400 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers compile --reps 10 --breakdown > $OUT/train_compile.log 2>&1; echo "bench rc=$?"
grep -h "ours\|torch.compile\|ratio\| x " $OUT/train_compile.log | tail -20
PYTHONPATH=$ROOT timeout 150 python3 -m model.cli contracts check --gpu-only > $OUT/contracts.log 2>&1; echo "contracts rc=$?"; tail -4 $OUT/contracts.log

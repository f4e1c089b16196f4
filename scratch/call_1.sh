#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader
timeout 150 python3 scratch/colsum_probe.py > $OUT/colsum.log 2>&1; echo colsum rc=$?
grep best $OUT/colsum.log
timeout 120 python3 scratch/attn_prof.py time > $OUT/attn_default.log 2>&1; echo attn rc=$?
ATTN_VARIANT='{"kv": {"teams": 1, "warps": 4}}' timeout 120 python3 scratch/attn_prof.py time > $OUT/attn_kv1.log 2>&1; echo attn1 rc=$?
ATTN_VARIANT='{"kv": {"teams": 1, "warps": 8}}' timeout 120 python3 scratch/attn_prof.py time > $OUT/attn_kv1w8.log 2>&1; echo attn1w8 rc=$?
tail -3 $OUT/attn_*.log

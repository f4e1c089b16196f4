#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > $OUT/smi.txt 2>&1
python3 scratch/attn_prof.py time 2>&1 | tee $OUT/time.txt
timeout 300 ncu --clock-control none --set full --kernel-name regex:attention python3 scratch/attn_prof.py once 8 1024 > $OUT/ncu.txt 2>&1
echo "ncu rc=$?"
tail -5 $OUT/ncu.txt

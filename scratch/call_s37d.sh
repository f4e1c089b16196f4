#!/bin/bash
# README's default run (ptxgen train, nothing given) on af9ccff+, then ncu of the attention kernels at 4 x 2048
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
ROOT=$PWD
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader
PYTHONPATH=$ROOT timeout 200 python3 -m model.cli train > $OUT/train_default.log 2>&1; echo "train rc=$?"
tail -5 $OUT/train_default.log
cp $(ls -d runs/*/ | head -1)metrics.jsonl $OUT/ 2>/dev/null; ls runs/*/ | head
PYTHONPATH=$ROOT timeout 150 ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --section SchedulerStats --section Occupancy --section InstructionStats -k regex:attention python3 scratch/attn_prof.py once 4 2048 > $OUT/ncu_attn.txt 2>&1; echo "ncu rc=$?"
grep -E "attention_|Duration|Throughput|Issue Slots|Eligible|No Eligible|Registers|Achieved Occupancy|Stall|Pipe" $OUT/ncu_attn.txt | head -60

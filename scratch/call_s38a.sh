#!/bin/bash
# Data: step breakdown both shapes (ours), clocks while it runs, attention kernel times, model GEMMs alone, ncu attention
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
ROOT=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit --format=csv
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 250 > $OUT/clocks.csv &
SMI=$!
PYTHONPATH=$ROOT timeout 150 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers none --reps 10 --breakdown > $OUT/breakdown.log 2>&1; echo "breakdown rc=$?"
echo "--- alone"; date +%T
PYTHONPATH=$ROOT timeout 150 python3 bench/bench_compute.py --only model-gemms > $OUT/model_gemms.log 2>&1; echo "gemms rc=$?"; date +%T
kill $SMI
PYTHONPATH=$ROOT timeout 60 python3 scratch/attn_prof.py time > $OUT/attn_time.log 2>&1; echo "attn rc=$?"; cat $OUT/attn_time.log
PYTHONPATH=$ROOT timeout 150 ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --section SchedulerStats --section Occupancy --section InstructionStats --section LaunchStats -k regex:attention python3 scratch/attn_prof.py once 4 2048 > $OUT/ncu_attn.txt 2>&1; echo "ncu rc=$?"
grep -E "attention_|Duration|Issue Slots Busy|No Eligible|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit" $OUT/ncu_attn.txt | head -60
grep -A80 "breakdown" $OUT/breakdown.log | head -150

#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
timeout 200 python3 scratch/residual_probe.py > $OUT/probe.txt 2>&1; echo "probe rc=$?"; cat $OUT/probe.txt | tail -8
timeout 200 python3 bench/bench_compute.py --only model-gemms > $OUT/model_gemms.log 2>&1; echo "gemms rc=$?"
grep -A60 "model's bf16 GEMMs" $OUT/model_gemms.log | head -50
timeout 150 ncu --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy --section SchedulerStats --section MemoryWorkloadAnalysis -k regex:gemm python3 scratch/gateup_once.py > $OUT/ncu_gateup.txt 2>&1; echo "ncu rc=$?"
grep -E "Duration|Throughput|Pipe|Issue|Eligible|Stall|No Eligible|Executed Ipc|Registers|Warp Cycles" $OUT/ncu_gateup.txt | head -60

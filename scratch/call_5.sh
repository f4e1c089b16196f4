#!/bin/bash
# the final tree: GPU tests, GPU contracts; then ncu of the down projection's dX with and without SwiGLU's backward
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv,noheader
timeout 300 python3 -m pytest -m cuda --deselect tests/test_distributed_multi_gpu.py -p no:cacheprovider -q > $OUT/pytest_cuda.log 2>&1; echo "pytest rc=$?"
tail -4 $OUT/pytest_cuda.log
timeout 120 python3 -m model.cli contracts check --gpu-only > $OUT/contracts.log 2>&1; echo "contracts rc=$?"
tail -4 $OUT/contracts.log
timeout 120 ncu --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy --section SchedulerStats --section MemoryWorkloadAnalysis -k regex:gemm python3 scratch/downdx_once.py > $OUT/ncu_downdx.txt 2>&1; echo "ncu rc=$?"
grep -E "Duration|Throughput|Pipe|Issue|Eligible|Stall|Executed Ipc|Registers|Warp Cycles|Shared Memory|L2 Hit|Mem Busy|Max Bandwidth" $OUT/ncu_downdx.txt | head -70

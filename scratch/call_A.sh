#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
timeout 420 python3 -m pytest -m cuda --deselect tests/test_distributed_multi_gpu.py -p no:cacheprovider -q > $OUT/pytest_cuda.log 2>&1; echo "pytest rc=$?"
tail -15 $OUT/pytest_cuda.log
timeout 150 python3 -m model.cli contracts check --gpu-only > $OUT/contracts.log 2>&1; echo "contracts rc=$?"
tail -8 $OUT/contracts.log

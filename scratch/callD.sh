export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python3 -m pytest -m cuda --deselect tests/test_distributed_multi_gpu.py -q -p no:warnings -x > $OUT/cuda.log 2>&1; echo "pytest rc=$?" >> $OUT/cuda.log
tail -3 $OUT/cuda.log
timeout 60 python3 scratch/step_probe.py > $OUT/step.log 2>&1; grep -E "launches|colsum" $OUT/step.log | tail -6

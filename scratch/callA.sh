export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python3 -m pytest -q tests/test_kernels_cuda.py -k "column_sums" tests/test_plan_cuda.py -p no:warnings > $OUT/tests.log 2>&1; echo "pytest rc=$?" >> $OUT/tests.log
tail -3 $OUT/tests.log
python3 scratch/pdl_probe.py > $OUT/pdl.log 2>&1; echo "rc=$?" >> $OUT/pdl.log
tail -6 $OUT/pdl.log

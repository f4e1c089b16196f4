export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python3 scratch/swiglu_probe3.py > $OUT/probe3.log 2>&1; cat $OUT/probe3.log

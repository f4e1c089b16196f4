#!/bin/bash
# PDL: correctness of graphs (bit-for-bit vs launched), then the step with and without programmatic edges, alternating
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python3 -c "import cuda.bindings; print('cuda-bindings', cuda.bindings.__version__)"
timeout 200 python3 -m pytest tests/test_plan_cuda.py tests/test_runtime_cuda.py -p no:cacheprovider -q -x > $OUT/pytest_plan.log 2>&1; echo "pytest rc=$?"; tail -3 $OUT/pytest_plan.log
A="--shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers none --reps 10"
run() { tag=$1; shift; timeout 150 "$@" $A > $OUT/$tag.log 2>&1; echo "$tag rc=$?"; grep '^  ours' $OUT/$tag.log; }
run pdl1 python3 bench/bench_train.py
run nopdl1 python3 scratch/no_pdl.py
run pdl2 python3 bench/bench_train.py
run nopdl2 python3 scratch/no_pdl.py

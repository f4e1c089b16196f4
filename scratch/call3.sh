export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
B="--shapes qwen2-0.5b:8x1024 --precisions bf16 --peers eager --reps 10 --breakdown"
(cd scratch/old_tree && PYTHONPATH=$PWD python3 bench/bench_train.py $B) > $OUT/old.log 2>&1
PYTHONPATH=$PWD python3 bench/bench_train.py $B > $OUT/new.log 2>&1
(cd scratch/old_tree && PYTHONPATH=$PWD python3 bench/bench_train.py $B) > $OUT/old2.log 2>&1
for f in old new old2; do echo "== $f"; grep -E "ours|tok/s|gemm_wgmma|attn|cross|swiglu|total|ms/step" $OUT/$f.log | head -30; done
export PYTHONPATH=$PWD
python3 -m pytest -m cuda --deselect tests/test_distributed_multi_gpu.py -q -p no:warnings > $OUT/cuda.log 2>&1; echo "pytest rc=$?"; tail -3 $OUT/cuda.log

export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > $OUT/smi.txt 2>&1
python3 -m pytest -m cuda --deselect tests/test_distributed_multi_gpu.py -q -p no:warnings > $OUT/cuda.log 2>&1; echo "pytest rc=$?" >> $OUT/cuda.log
tail -3 $OUT/cuda.log
python3 scratch/step_probe.py > $OUT/step.log 2>&1; grep -E "launches|colsum|rmsnorm_bwd" $OUT/step.log | tail -8
python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers compile --reps 10 --breakdown --json $OUT/bench.json > $OUT/bench.log 2>&1; echo "bench rc=$?" >> $OUT/bench.log
grep -A12 "== training step" $OUT/bench.log | tail -12
python3 -m model.cli contracts check --gpu-only > $OUT/contracts.log 2>&1; echo "contracts rc=$?" >> $OUT/contracts.log
tail -2 $OUT/contracts.log

export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > $OUT/smi.txt 2>&1
python3 -m pytest -m cuda --deselect tests/test_distributed_multi_gpu.py -q -p no:warnings > $OUT/cuda.log 2>&1; echo "pytest rc=$?" >> $OUT/cuda.log
tail -3 $OUT/cuda.log
python3 -m model.cli contracts check --gpu-only > $OUT/contracts.log 2>&1; echo "contracts rc=$?" >> $OUT/contracts.log
tail -3 $OUT/contracts.log
python3 bench/bench_compute.py --only model-gemms > $OUT/gemms.log 2>&1; tail -25 $OUT/gemms.log
python3 scratch/swiglu_probe.py > $OUT/swiglu.log 2>&1; cat $OUT/swiglu.log
python3 scratch/swiglu_probe2.py > $OUT/swiglu2.log 2>&1; cat $OUT/swiglu2.log
python3 -m model.cli train > $OUT/train.log 2>&1; echo "train rc=$?" >> $OUT/train.log
cp runs/small/metrics.jsonl runs/small/sample.txt $OUT/ 2>/dev/null; tail -4 $OUT/train.log

#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
mkdir -p scratch/new && cp ptxgen/kernels/attention_tc.py ptxgen/kernels/attention_wgmma.py scratch/new/
swap() { cp scratch/$1/attention_tc.py scratch/$1/attention_wgmma.py ptxgen/kernels/; }
for v in new old new old; do swap $v; echo "== $v"; python3 scratch/attn_prof.py time | grep x; done 2>&1 | tee $OUT/ab.txt
swap new
timeout 260 python3 -m pytest -q -m cuda --deselect tests/test_distributed_multi_gpu.py -p no:cacheprovider 2>&1 | tail -4 | tee $OUT/pytest.txt
timeout 250 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers compile --reps 10 --breakdown > $OUT/bench.txt 2>&1
echo "bench rc=$?"; grep -E "ours|compile|ratio|tokens" $OUT/bench.txt | head -20

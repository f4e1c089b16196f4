#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
mkdir -p scratch/new && cp ptxgen/kernels/attention_tc.py ptxgen/kernels/attention_wgmma.py scratch/new/
swap() { cp scratch/$1/attention_tc.py scratch/$1/attention_wgmma.py ptxgen/kernels/; }
for v in new old new old; do swap $v; echo "== $v"; python3 scratch/attn_prof.py time; done 2>&1 | tee $OUT/ab.txt
swap new
timeout 300 python3 -m pytest -q -m cuda tests/test_attention_tc_cuda.py tests/test_attention_wgmma_bwd_cuda.py 2>&1 | tail -5 | tee $OUT/pytest.txt

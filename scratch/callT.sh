#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
mkdir -p scratch/new && cp ptxgen/kernels/attention_tc.py ptxgen/kernels/attention_wgmma.py scratch/new/
swap() { cp scratch/$1/attention_tc.py scratch/$1/attention_wgmma.py ptxgen/kernels/; }
for v in new old new old; do swap $v; echo "== $v"; python3 scratch/attn_prof.py time | grep x; done 2>&1 | tee $OUT/ab.txt
swap new

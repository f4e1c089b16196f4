#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
timeout 200 python3 scratch/gemm_probe.py 2>&1 | tee $OUT/gemm.txt
for v in '{}' '{"q": {"warps": 8}, "fwd": {"warps": 8}}' '{"q": {"tile": 128}, "kv": {"tile": 32}}'; do
  echo "== $v"; ATTN_VARIANT="$v" timeout 100 python3 scratch/attn_prof.py time 2>&1 | grep -v "^{"
done 2>&1 | tee $OUT/attn.txt

#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
for v in '{}' '{"fwd": {"tile": 64}, "q": {"tile": 32}}' '{}' '{"fwd": {"tile": 64}, "q": {"tile": 32}}'; do
  echo "== $v"; ATTN_VARIANT="$v" timeout 100 python3 scratch/attn_prof.py time 2>&1 | grep -v "^{"
done 2>&1 | tee $OUT/attn.txt

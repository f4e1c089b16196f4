#!/bin/bash
# staged_rows=128 (the in-place epilogues' whole tile staged while it is multiplied, 3 stages): GPU tests, then A/B
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
timeout 120 python3 -m pytest -m cuda -p no:cacheprovider -q tests/test_gemm_tc_cuda.py -k "swiglu_grad or residual_adds" > $OUT/pytest.log 2>&1; echo "pytest rc=$?"
tail -3 $OUT/pytest.log
V='{"base": {}, "whole": {"staged_rows": 128, "stages": 3}}'
timeout 80 python3 scratch/variant_probe.py down grad_input "$V" > $OUT/down_dx.log 2>&1; echo "down dX rc=$?"
grep -h "^---\|down dX.*tail\|Error" $OUT/down_dx.log
timeout 80 python3 scratch/variant_probe.py down forward "$V" > $OUT/down_fwd.log 2>&1; echo "down fwd rc=$?"
grep -h "^---\|down fwd.*tail\|Error" $OUT/down_fwd.log
timeout 60 python3 scratch/variant_probe.py o_proj forward "$V" > $OUT/o_fwd.log 2>&1; echo "o fwd rc=$?"
grep -h "^---\|o_proj fwd.*tail\|Error" $OUT/o_fwd.log

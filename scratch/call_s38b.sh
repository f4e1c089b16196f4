#!/bin/bash
# attention forward a tile behind: bit-compare with base, kernel times, GPU attention tests, step A/B
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
ROOT=$PWD
(cd scratch/base_tree && PYTHONPATH=$PWD python3 $ROOT/scratch/attn_dump.py base)
PYTHONPATH=$ROOT python3 scratch/attn_dump.py new
python3 - <<'PY'
import numpy as np, os, glob
O = os.environ["OUT"]
for f in sorted(glob.glob(f"{O}/base_*.npy")):
    g = f.replace("/base_", "/new_")
    a, b = np.load(f), np.load(g)
    print(os.path.basename(f), "bit-equal" if np.array_equal(a, b) else f"DIFFER max {np.abs(a.astype(float)-b.astype(float)).max()}")
PY
for tree in base new; do
  if [ $tree = base ]; then dir=$ROOT/scratch/base_tree; else dir=$ROOT; fi
  (cd $dir && PYTHONPATH=$dir timeout 60 python3 $ROOT/scratch/attn_prof.py time 2>&1 | tail -3 | sed "s/^/$tree /")
done
PYTHONPATH=$ROOT timeout 200 python3 -m pytest -m cuda tests/test_attention_tc_cuda.py tests/test_attention_wgmma_bwd_cuda.py tests/test_model_bf16_cuda.py -p no:cacheprovider -q > $OUT/pytest_attn.log 2>&1; echo "pytest rc=$?"; tail -3 $OUT/pytest_attn.log
for tree in base new base new; do
  if [ $tree = base ]; then dir=$ROOT/scratch/base_tree; else dir=$ROOT; fi
  (cd $dir && PYTHONPATH=$dir timeout 85 python3 bench/bench_train.py --shapes qwen2-0.5b:8x1024 qwen2-0.5b:4x2048 --precisions bf16 --peers none --reps 15 > $OUT/ab_$tree.$RANDOM.log 2>&1; echo "$tree train rc=$?")
  grep -h "^  ours" $(ls -t $OUT/ab_*.log | head -1)
done

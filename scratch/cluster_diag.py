"""Cluster GEMM diagnostics: occupancy counts, and where a clustered result differs from the plain one."""
import dataclasses, sys
import numpy as np
sys.path.insert(0, "tests")
from cuda.bindings import driver as cu
from runtime import ModuleCache
from runtime.driver import call
import test_gemm_tc_cuda as t
from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec

cache = ModuleCache(use_disk=False)
spec = GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, cluster=2)
k = cache.get(spec)
print("resident_blocks (cluster attr):", k.resident_blocks(spec.threads))
for fields, shape, resident in [(dict(trans_b=False), (304, 520, 1000), 4), (dict(trans_b=False), (304, 520, 1000), 6),
                                (dict(), (304, 520, 1000), 4), (dict(trans_b=False), (256, 512, 1024), 4),
                                (dict(trans_b=False), (1000, 4864, 896), 8)]:
    s1 = GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, **fields)
    s2 = dataclasses.replace(s1, cluster=2)
    ops = t.tma_operands(s1, *shape)
    for rep in range(2):
        a, ref = t.run_tma(cache, s1, *shape, resident=resident, operands=ops)
        b, _ = t.run_tma(cache, s2, *shape, resident=resident, operands=ops)
        a, b = a[0], b[0]
        bad = ~((a == b) | (np.isnan(a) & np.isnan(b)))
        rows, cols = np.nonzero(bad)
        print(fields, shape, resident, "rep", rep, "plain nan", np.isnan(a).sum(), "clustered nan", np.isnan(b).sum(),
              "differ", bad.sum(), "rows", (rows.min(), rows.max()) if rows.size else None,
              "cols", (cols.min(), cols.max()) if cols.size else None,
              "tiles", sorted({(r // 128, c // 128) for r, c in zip(rows, cols)})[:12])

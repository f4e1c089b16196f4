"""Hypothesis check: rank 1's shared addresses carry the cluster CTA rank in bit 24 (0x01000000), which
`descriptor` (no mask) shifts into bit 20 = the LBO field's bit 4 (LBO 512 -> 528 units, 8192 -> 8448 bytes).
Harmless for K-major swizzled operands (LBO ignored) and for one-chunk MN-major A (m64); breaks the 2nd
64-column chunk of an MN-major B (n128). Fix: keep the start address to its 14-bit field (& 0x3FFFF before >> 4).
Run on the GPU: python3 scratch/cluster_desc_fix.py  (patched kernel vs cluster=1, MN-major B)."""
import dataclasses, sys
import numpy as np
sys.path.insert(0, "tests")
from ptxgen.builder import T
from ptxgen.kernels import gemm_wgmma as gw

def descriptor(b, addr, bits):
    return b.or_(b.cvt(T.U64, b.shr(b.and_(addr, 0x3FFFF, T.U32), 4)), bits, T.B64)

if "--unpatched" not in sys.argv:
    gw.descriptor = descriptor

if __name__ == "__main__" and "--emit" in sys.argv:
    from ptxgen.spec import Target
    from ptxgen.assemble import assemble
    ptx = gw.GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, trans_b=False, cluster=2).emit(Target("sm_90a"))
    print("\n".join(l for l in ptx.splitlines() if "0x3FFFF" in l or "262143" in l)[:400])
    assemble(ptx, "sm_90a"); print("assembled ok")
elif __name__ == "__main__":
    from runtime import ModuleCache
    import test_gemm_tc_cuda as t
    for fields, shape, resident in [(dict(trans_b=False), (304, 520, 1000), 4), (dict(trans_b=False), (256, 512, 1024), 4),
                                    (dict(trans_b=False), (1000, 4864, 896), 8), (dict(), (304, 520, 1000), 4)]:
        cache = ModuleCache(use_disk=False)
        s1 = gw.GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, **fields)
        s2 = dataclasses.replace(s1, cluster=2)
        ops = t.tma_operands(s1, *shape)
        a, _ = t.run_tma(cache, s1, *shape, resident=resident, operands=ops)
        b, _ = t.run_tma(cache, s2, *shape, resident=resident, operands=ops)
        bad = ~((a[0] == b[0]) | (np.isnan(a[0]) & np.isnan(b[0])))
        r, c = np.nonzero(bad)
        print(fields, shape, "differ", int(bad.sum()), sorted({(int(x) // 128, int(y) // 64) for x, y in zip(r, c)})[:6], flush=True)

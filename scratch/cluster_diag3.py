"""Cluster GEMM diagnostics 3: the remote release's semantics and coupling, timing and the MN-major fault."""
import dataclasses, sys
import numpy as np
sys.path.insert(0, "tests")
sys.argv = sys.argv[:1]
exec(open("scratch/cluster_diag2.py").read().split("for mode in")[0])  # produce patch (MODE), timing()
from ptxgen import builder as pb
from ptxgen.builder import T
import runtime.cache as _rc
REMOTE = {"v": "release.cluster"}
orig_remote = pb.KernelBuilder.mbarrier_arrive_remote

def remote(self, bar, block, guard=None):
    v = REMOTE["v"]
    if v == "release.cluster":
        return orig_remote(self, bar, block, guard)
    if v == "local":  # no coupling: the arrival stays in this block
        return self.mbarrier_arrive(bar, guard=guard)
    at = self.reg(T.U32)
    self._emit(f"mapa.shared::cluster.u32 {at}, {bar}, {self._op('mapa', block, T.U32, 'block')}", guard)
    self._emit(f"mbarrier.arrive.shared::cluster.b64 _, [{at}]", guard)  # default: release at cta scope

pb.KernelBuilder.mbarrier_arrive_remote = remote
for produce_mode, remote_mode in [("normal", "cta"), ("local", "local"), ("local", "cta"), ("normal", "release.cluster")]:
    _rc._TEXTS.clear()
    MODE["v"], REMOTE["v"] = produce_mode, remote_mode
    for tb in (True, False):
        s1 = GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, trans_b=tb)
        s2 = dataclasses.replace(s1, cluster=2)
        line = [produce_mode, remote_mode, "trans_b", tb]
        for s in ((s1, s2) if tb and produce_mode == "normal" and remote_mode == "cta" else (s2,)):
            us, grid = timing(s, 8192, 9728, 896)
            line += [f"cluster{s.cluster} {us:.1f}us"]
        cache = ModuleCache(use_disk=False)
        ops = t.tma_operands(s1, 304, 520, 1000)
        a, _ = t.run_tma(cache, s1, 304, 520, 1000, resident=4, operands=ops)
        b2, _ = t.run_tma(cache, s2, 304, 520, 1000, resident=4, operands=ops)
        bad = ~((a[0] == b2[0]) | (np.isnan(a[0]) & np.isnan(b2[0])))
        r, cc = np.nonzero(bad)
        line += ["differ", int(bad.sum()), sorted({(int(x) // 128, int(y) // 64) for x, y in zip(r, cc)})[:4]]
        print(*line, flush=True)

"""Cluster GEMM diagnostics 2: timing alone (cluster 1 / 2 / 2 without multicast), and the MN-major B fault
with the pieces' owners swapped or not multicast."""
import dataclasses, os, sys, time
import numpy as np
sys.path.insert(0, "tests")
from ptxgen.kernels import tma_pipeline as tp
from ptxgen.kernels.ring import Slot
from runtime import ModuleCache, DeviceArray
from runtime.driver import synchronize
import test_gemm_tc_cuda as t
from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec

MODE = {"v": "normal"}
orig_produce = tp.TmaPipeline.produce

def produce(self):
    if MODE["v"] == "normal" or self.cluster == 1:
        return orig_produce(self)
    spec, b, cluster = self.spec, self.b, self.cluster
    maps = [b.cvta_global(b.ld_param(x)) for x in ("tmap_a", "tmap_b")]
    slot = Slot(self.ring)
    mine = [b.setp("eq", self.rank, r) for r in range(cluster)]
    with b.loop(self.mine, "tile") as i:
        unit = self.unit(i)
        split, row0, col0 = unit.split, unit.row0, unit.col0
        k_at = b.mul(split, self.k) if self.split_tail is None else b.mul(unit.k0, spec.k_elems)
        with b.loop(unit.count, "slice"):
            at, full, empty = self.stage(slot)
            b.mbarrier_wait(empty, b.xor(slot.phase, 1))
            b.mbarrier_expect_tx(full, spec.stage_bytes)
            paired = (False, spec.swiglu_act)
            for operand, (tensor_map, outer0, rows, offset, mn, pair) in enumerate(zip(
                    maps, (row0, col0), (spec.block_m, spec.block_n), (0, spec.block_m * 128),
                    spec.mn_major, paired)):
                shared = operand == 1
                for j, (dst, coords) in enumerate(self._boxes(at, outer0, rows, offset, mn, pair, k_at, shared)):
                    if not shared or MODE["v"] == "local":
                        b.tma_load(dst, tensor_map, coords, full)
                    elif MODE["v"] == "swap":
                        b.tma_load(dst, tensor_map, coords, full, guard=mine[(j + 1) % cluster], multicast=3)
                    elif MODE["v"] == "other":  # each piece sent only to the other block, and loaded locally
                        b.tma_load(dst, tensor_map, coords, full, guard=mine[j % cluster], multicast=1 << (1 - j % 2))
                        b.tma_load(dst, tensor_map, coords, full, guard=mine[j % cluster])
            b.add(k_at, spec.k_elems, out=k_at)
            slot.advance()
    for _ in range(spec.stages):
        b.mbarrier_wait(self.empty.address(slot), b.xor(slot.phase, 1))
        slot.advance()

tp.TmaPipeline.produce = produce

def timing(spec, m, n, k, reps=20):
    from runtime.tensormap import gemm_tensor_maps
    cache = ModuleCache(use_disk=False)
    a = DeviceArray.from_numpy(np.zeros((m, k), np.uint16), "bf16")
    bm = DeviceArray.from_numpy(np.zeros((n, k) if spec.trans_b else (k, n), np.uint16), "bf16")
    c = DeviceArray.from_numpy(np.zeros((m, n), np.float32))
    maps = gemm_tensor_maps(spec, a.ptr, bm.ptr, m, n, k)
    kern = cache.get(spec)
    dims = spec.launch_dims(m, n, resident=kern.resident_blocks(spec.threads))
    args = spec.arguments(maps[0].ptr, maps[1].ptr, c.ptr, m, n, k)
    kern(*dims, *args); synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        kern(*dims, *args)
    synchronize()
    return (time.perf_counter() - t0) / reps * 1e6, dims[0]

import runtime.cache as _rc
for mode in ("normal", "local", "swap", "other"):
    _rc._TEXTS.clear()  # (this diagnostic emits other PTX under the same key on purpose)
    MODE["v"] = mode
    for tb in (True, False):
        s1 = GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, trans_b=tb)
        s2 = dataclasses.replace(s1, cluster=2)
        line = [mode, "trans_b", tb]
        for s in ((s1, s2) if mode == "normal" else (s2,)):
            us, grid = timing(s, 8192, 9728, 896)
            line += [f"cluster{s.cluster} {us:.1f}us grid {grid}"]
        cache = ModuleCache(use_disk=False)
        ops = t.tma_operands(s1, 304, 520, 1000)
        a, _ = t.run_tma(cache, s1, 304, 520, 1000, resident=4, operands=ops)
        b2, _ = t.run_tma(cache, s2, 304, 520, 1000, resident=4, operands=ops)
        bad = ~((a[0] == b2[0]) | (np.isnan(a[0]) & np.isnan(b2[0])))
        r, cc = np.nonzero(bad)
        line += ["differ", int(bad.sum()), sorted({(x // 128, y // 64) for x, y in zip(r, cc)})[:6]]
        print(*line, flush=True)

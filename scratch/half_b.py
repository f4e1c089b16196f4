"""Upper bound of 2-CTA B multicast: every TMA GEMM loads B only on even slices (odd slices reuse stale
smem: garbage results, timing only). Run as bench_train with the same args (PTXGEN_CACHE_DIR: a temp dir)."""
import os, sys
sys.path.insert(0, "bench")
from ptxgen.builder import T
from ptxgen.hw import SWIZZLE_ROW
from ptxgen.kernels import tma_pipeline as tp
from ptxgen.kernels.ring import Slot

MODE = os.environ.get("HALF", "b")  # b: B halved; a: A halved; none


def produce(self):
    spec, b = self.spec, self.b
    maps = [b.cvta_global(b.ld_param(x)) for x in ("tmap_a", "tmap_b")]
    slot = Slot(self.ring)
    b_bytes = spec.block_n * spec.k_elems * spec.dtype.bytes
    a_bytes = spec.block_m * spec.k_elems * spec.dtype.bytes
    skip_bytes = {"b": b_bytes, "a": a_bytes}.get(MODE, 0)
    with b.loop(self.mine, "tile") as i:
        unit = self.unit(i)
        split, row0, col0 = unit.split, unit.row0, unit.col0
        k_at = b.mul(split, self.k) if self.split_tail is None else b.mul(unit.k0, spec.k_elems)
        with b.loop(unit.count, "slice") as s:
            at, full, empty = self.stage(slot)
            b.mbarrier_wait(empty, b.xor(slot.phase, 1))
            odd = b.setp("ne", b.and_(s, 1), 0)
            if skip_bytes:
                b.mbarrier_expect_tx(full, spec.stage_bytes, guard=~odd)
                b.mbarrier_expect_tx(full, spec.stage_bytes - skip_bytes, guard=odd)
            else:
                b.mbarrier_expect_tx(full, spec.stage_bytes)
            paired = (False, spec.swiglu_act)
            for which, (tensor_map, outer0, rows, offset, mn, pair) in enumerate(zip(
                    maps, (row0, col0), (spec.block_m, spec.block_n), (0, spec.block_m * SWIZZLE_ROW), spec.mn_major,
                    paired)):
                g = ~odd if (MODE == "b" and which == 1) or (MODE == "a" and which == 0) else None
                if pair:
                    for half in range(2):
                        b.tma_load(b.add(at, offset + half * 64 * SWIZZLE_ROW), tensor_map,
                                   (k_at, b.shr(outer0, 1), half), full, guard=g)
                elif not mn:
                    b.tma_load(b.add(at, offset), tensor_map, (k_at, outer0), full, guard=g)
                for j in range(rows // 64 if mn else 0):
                    b.tma_load(b.add(at, offset + j * tp.MN_CHUNK), tensor_map, (b.add(outer0, 64 * j), k_at),
                               full, guard=g)
            b.add(k_at, spec.k_elems, out=k_at)
            slot.advance()


tp.TmaPipeline.produce = produce
import bench_train  # noqa: E402
sys.exit(bench_train.main(sys.argv[1:]))
